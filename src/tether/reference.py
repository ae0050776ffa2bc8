"""Where the reference statistics come from.

Three sources, one interface (`Reference`); memory cost for a model of P parameters in dtype d:
- `ModelReference` (reference.mode=copy): a frozen copy of the initial model (or reference.path) in memory:
  + P*d bytes, one extra forward per step.
- `AdapterReference` (reference.mode=adapter, LoRA): the policy itself with its adapters disabled: no extra
  weights, one extra forward per step.
- `CachedReference` (reference.mode=cache): one pass over the data before training, stored in the run folder;
  no reference model in memory and no reference forward during training. Sequence-level objectives (dpo, ipo,
  cdpo, hdpo) cache two float32 log-probs per pair (exact). Objectives that need the reference's
  distributions (tdpo1, tdpo2, epsilon_dpo) cache the reference's final hidden states of every response token
  (H * 4 bytes per token in float32, the default, or H * 2 in float16/bfloat16; on disk, memory-mapped) and
  its output head (weight, bias and `HeadTransform`, in meta.json), from which the chunked head recomputes
  the reference logits exactly up to the cache dtype's rounding. Every cache also holds the reference's summed
  next-token entropy per response (`Reference.entropy_sums`, for an entropy target given as a fraction).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tether.batch import PreferenceBatch
from tether.causal_lm import final_hidden_states, output_head
from tether.heads import (
    IDENTITY,
    HeadTransform,
    StatRequest,
    response_positions,
    sequence_sums,
    token_stats,
)


class Reference(ABC):
    """Reference statistics for a batch: hidden states at response positions, or sequence log-probs."""

    @abstractmethod
    def hidden(self, batch: PreferenceBatch, indices: list[int], mask: torch.Tensor) -> torch.Tensor | None:
        """(N, H) reference final hidden states at the response positions selected by mask, or None."""

    def sequence_logps(self, batch: PreferenceBatch, indices: list[int], mask: torch.Tensor) -> torch.Tensor:
        """(2B,) reference sequence log-probs (only for references that do not provide hidden states)."""
        raise NotImplementedError(f"{type(self).__name__} provides hidden states, not sequence log-probs")

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None, HeadTransform]:
        """The reference's output embedding (V, H), bias (V,) or None, and its head transform."""
        raise NotImplementedError

    @torch.no_grad()
    def entropy_sums(
        self, dataset, collate, indices: list[int], *, batch_size: int, chunk_size: int, device
    ) -> torch.Tensor:
        """(2,) float64: the reference's next-token entropy summed over every response token (chosen and
        rejected) of the pairs `indices` of `dataset`, and the number of those tokens. One reference pass."""
        weight, bias, transform = self.head()
        out = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            batch = collate([dataset[i] for i in idx]).to(device)
            mask, targets = response_positions(batch.labels)
            tokens = token_stats(
                self.hidden(batch, idx, mask),
                weight,
                targets,
                bias=bias,
                request=StatRequest(entropy=True),
                chunk_size=chunk_size,
                transform=transform,
            )
            out[0] += tokens.entropy.double().sum().cpu()
            out[1] += float(mask.sum())
        return out


class ModelReference(Reference):
    """A frozen reference model in memory (a copy of the initial policy, or another folder)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def hidden(self, batch, indices, mask):
        return final_hidden_states(self.model, batch)[:, :-1][mask]

    def head(self):
        return output_head(self.model)


class AdapterReference(Reference):
    """The LoRA policy with its adapters disabled: the initial model without a second copy in memory."""

    def __init__(self, peft_model: nn.Module, split_rows: bool = True):
        self.model = peft_model
        self.split_rows = split_rows  # as the policy's forward (`tether.causal_lm.final_hidden_states`)

    @torch.no_grad()
    def hidden(self, batch, indices, mask):
        with self.model.disable_adapter():
            was_training = self.model.training
            self.model.eval()
            try:
                return final_hidden_states(self.model, batch, self.split_rows)[:, :-1][mask]
            finally:
                self.model.train(was_training)

    def head(self):
        # The output head is never adapted (modeling.check_supported refuses LoRA on lm_head).
        weight, bias, transform = output_head(self.model)
        return weight.detach(), None if bias is None else bias.detach(), transform


_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class CachedReference(Reference):
    """Reference statistics computed once (`build_reference_cache`) and read from the run folder."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.meta = meta
        self.device = torch.device(device)
        tensors = load_file(str(folder / "reference.safetensors"))
        self.logps = tensors["logps"]  # (P, 2): chosen, rejected
        self.lengths = tensors["lengths"]  # (P, 2) response tokens per side
        self.offsets = tensors["offsets"]  # (P, 2) start row of each side in hidden.npy
        self.entropy = tensors["entropy"]  # (P, 2) summed reference token entropy per side, float64
        self.has_hidden = bool(meta["hidden"])
        self._weight = tensors.get("head_weight")
        self._bias = tensors.get("head_bias")
        self._transform = HeadTransform(**meta["head_transform"]) if "head_transform" in meta else IDENTITY
        self._hidden = None
        if self.has_hidden:
            self._dtype = getattr(torch, meta["hidden_dtype"])
            self._hidden = np.load(folder / "hidden.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.logps.shape[0]

    def _check(self, indices: list[int], mask: torch.Tensor) -> None:
        want = torch.cat([self.lengths[indices, 0], self.lengths[indices, 1]])
        got = mask.sum(1).cpu()
        if not torch.equal(want, got):
            raise RuntimeError(
                "the reference cache does not match the data (response token counts differ): the data, the"
                " tokenizer or the truncation changed since the cache was built; delete the cache folder to rebuild"
            )

    def hidden(self, batch, indices, mask):
        if not self.has_hidden:
            return None
        self._check(indices, mask)
        parts = []
        for side in (0, 1):
            for i in indices:
                start, n = int(self.offsets[i, side]), int(self.lengths[i, side])
                rows = np.array(self._hidden[start : start + n])  # a copy: the memory map is read-only
                parts.append(torch.from_numpy(rows))
        flat = torch.cat(parts)
        if self._dtype == torch.bfloat16:
            flat = flat.view(torch.bfloat16)
        return flat.to(self.device)

    def sequence_logps(self, batch, indices, mask):
        self._check(indices, mask)
        idx = torch.tensor(indices)
        return torch.cat([self.logps[idx, 0], self.logps[idx, 1]]).to(self.device)

    def head(self):
        bias = None if self._bias is None else self._bias.to(self.device)
        return self._weight.to(self.device), bias, self._transform

    def entropy_sums(self, dataset, collate, indices, *, batch_size, chunk_size, device):
        """As `Reference.entropy_sums`, read from the cache (no pass)."""
        idx = torch.tensor(indices, dtype=torch.long)
        return torch.stack([self.entropy[idx].sum(), self.lengths[idx].sum().double()])


@torch.no_grad()
def build_reference_cache(
    model: nn.Module,
    dataset,
    collate,
    folder: str | Path,
    *,
    store_hidden: bool,
    hidden_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = True,
    key: dict | None = None,
) -> Path:
    """One pass of the reference over `dataset` (in index order); writes the cache atomically to `folder`.

    collate: list of dataset items -> PreferenceBatch. Stores per pair the chosen / rejected reference
    log-probs (float32), the summed next-token entropy of each response (float64) and, if store_hidden, every response token's final hidden state in hidden_dtype.
    key: JSON-serializable description of what the cache was built from, stored in meta.json so that a
    caller can tell a stale cache from a reusable one.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    model.eval()
    weight, bias, transform = output_head(model)
    n = len(dataset)
    logps = torch.zeros(n, 2, dtype=torch.float32)
    entropy = torch.zeros(n, 2, dtype=torch.float64)
    lengths = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        item = dataset[i]
        lengths[i, 0], lengths[i, 1] = len(item.chosen_ids), len(item.rejected_ids)
    offsets = torch.zeros(n, 2, dtype=torch.long)
    flat_order = torch.cat([lengths[:, 0], lengths[:, 1]])  # rows: all chosen sides, then all rejected
    starts = torch.cumsum(flat_order, 0) - flat_order
    offsets[:, 0], offsets[:, 1] = starts[:n], starts[n:]
    hidden_store = None
    if store_hidden:
        h = weight.shape[1]
        hidden_store = np.lib.format.open_memmap(
            staging / "hidden.npy",
            mode="w+",
            dtype=_NP_DTYPES[hidden_dtype],
            shape=(int(flat_order.sum()), h),
        )
    bar = tqdm(total=n, desc="reference cache", disable=not progress, unit="pair")
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        batch = collate([dataset[i] for i in idx]).to(device)
        mask, targets = response_positions(batch.labels)
        got = mask.sum(1).cpu()
        want = torch.cat([lengths[idx, 0], lengths[idx, 1]])
        if not torch.equal(got, want):
            raise RuntimeError(
                "response token counts differ between the dataset items and their collated batch"
            )
        hidden = final_hidden_states(model, batch)[:, :-1][mask]
        tokens = token_stats(
            hidden,
            weight,
            targets,
            bias=bias,
            request=StatRequest(entropy=True),
            chunk_size=chunk_size,
            transform=transform,
        )
        seq = sequence_sums(tokens.logps, mask).float().cpu()
        ent = sequence_sums(tokens.entropy.double(), mask).cpu()
        b = len(idx)
        logps[idx, 0], logps[idx, 1] = seq[:b], seq[b:]
        entropy[idx, 0], entropy[idx, 1] = ent[:b], ent[b:]
        if hidden_store is not None:
            rows = hidden.to(hidden_dtype).cpu()
            if hidden_dtype == torch.bfloat16:
                rows = rows.view(torch.int16)
            rows = rows.numpy()
            pos = 0
            for side in (0, 1):
                for i in idx:
                    k, off = int(lengths[i, side]), int(offsets[i, side])
                    hidden_store[off : off + k] = rows[pos : pos + k]
                    pos += k
        bar.update(b)
    bar.close()
    tensors = {"logps": logps, "lengths": lengths, "offsets": offsets, "entropy": entropy}
    if store_hidden:
        hidden_store.flush()
        del hidden_store
        tensors["head_weight"] = weight.detach().float().cpu().contiguous()
        if bias is not None:
            tensors["head_bias"] = bias.detach().float().cpu().contiguous()
    save_file(tensors, str(staging / "reference.safetensors"))
    meta = {
        "pairs": n,
        "hidden": store_hidden,
        "hidden_dtype": str(hidden_dtype).removeprefix("torch."),
        "head_transform": transform.to_dict(),
        "key": key,
    }
    (staging / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    staging.rename(folder)
    return folder
