"""Stage one's settings: what a dump stores (and so its fingerprint), and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import KdcacheError, option
from .checks import AMP_CHOICES, DEFAULT_MASK_KEY, DEVICE, MAX_BATCH, MAX_WORKERS, Settings, setting

if TYPE_CHECKING:
    from ..format.codecs import Codec

__all__ = ["DumpConfig"]


@dataclass(frozen=True)
class DumpConfig(Settings):
    """Stage-one settings (``kdcache dump-teacher``'s flags and ``--config`` TOML keys, declared here).

    The first group defines *what is stored* and so the cache's fingerprint
    (:meth:`fingerprint_inputs`); the second only *how the dump runs*, and a dump that differs
    in it alone is still a cache hit.
    """

    what: ClassVar[str] = "dump setting"
    # what is stored
    hidden: tuple[str, ...] = setting((), "Submodule whose output to store (repeatable); 'mod#0' takes a tuple's "
                                          "element 0.", metavar="MODULE")
    output_key: str | None = setting(None, "Pick the logits from a tuple (index), dict (key) or object (attribute).",
                                     metavar="KEY")
    logits_dtype: str = setting("float16", "Stored logits dtype: float16, float32 or bfloat16.", metavar="DTYPE")
    hidden_dtype: str = setting("float16", "Stored hidden-state dtype: float16, float32 or bfloat16.", metavar="DTYPE")
    topk: int | None = setting(None, "Store the K largest logits per position + ids + logsumexp (sparse; large "
                                     "vocabularies).", metavar="K")
    sample_k: int | None = setting(None, "Store N ids sampled from the teacher per position, as unique ids + counts "
                                         "(unbiased sparse KD).", metavar="N")
    sample_temperature: float = setting(1.0, "Temperature of the distribution --sample-k/--tail-samples draw from.",
                                        metavar="T")
    tail_samples: int | None = setting(None, "With --topk K: also store N draws from the other classes (hybrid: exact "
                                             "head, unbiased tail).", metavar="N")  # HybridCodec
    sample_draws: str = setting("iid", "How --sample-k/--tail-samples draw: iid or systematic (evenly spaced "
                                       "quantiles; lower variance).", metavar="HOW")  # kdcache.format.draws
    head: str | None = setting(None, "Store the input of this output nn.Linear per token and its weights once: the "
                                     "exact dense logits, computed at training time (docs/head-caches.md).",
                               metavar="MODULE")  # HeadCodec
    head_dtype: str = setting("float16", "Stored dtype of --head's input: float16, or int8 with a scale per token.",
                              metavar="DTYPE")
    vocab_size: int | None = setting(None, "Real vocabulary size when the teacher's output layer is padded.",
                                     metavar="V")
    mask_key: str = setting(DEFAULT_MASK_KEY, "Inputs key of the (B, L) attention mask; padding is stored as zeros "
                                              "and masked.", metavar="KEY")
    views: int | None = setting(None, "Store K augmented views per sample (row = sample*K + view), each made by the "
                                      "dataset's transform under RNGs seeded from (seed, sample, view).", metavar="K")
    seed: int | None = setting(None, "Seed of augmentation views and of --sample-k/--tail-samples draws.", shown=0,
                               metavar="S")
    amp: str = setting("auto", "Autocast: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none.", metavar="MODE")
    # how the dump runs
    batch_size: int = setting(256, "Teacher batch size.", metavar="N")
    num_workers: int = setting(0, "DataLoader workers preparing batches.", metavar="N")
    device: str = setting("auto", "auto (cuda when present), cpu or cuda[:N].", metavar="DEVICE")
    block_rows: int | None = setting(None, "Rows per write block (default: chosen for ~2 MB chunks).", metavar="N")
    allow_nonfinite: bool = setting(False, "Store NaN/inf teacher outputs instead of stopping at the first.",
                                    switch="--allow-nonfinite")
    writer_threads: int = setting(8, "Threads writing blocks in parallel.", metavar="N")
    layout: str = setting("auto", "Sequence outputs: packed (real tokens only), padded (padding stored as zeros) or "
                                  "auto (packed when the inputs have an attention mask).", metavar="LAYOUT")
    cache_root: str | None = setting(None, "Where fingerprint-named caches live (default $KDCACHE_HOME or "
                                           "./kdcache-store).", metavar="DIR", path=True)
    overwrite: bool = setting(False, "Replace the kdcache cache at the path (another fingerprint, or redo); never "
                                     "anything else.", switch="--overwrite")
    repair: bool = setting(False, "Write again only the blocks kdcache verify finds damaged (same teacher, data and "
                                  "settings).", switch="--repair")
    progress: bool = setting(True, "Show a progress bar.", shown="progress", switch="--progress/--no-progress")

    def _rules(self) -> list[tuple[bool, str]]:
        from ..format.codecs import DTYPES  # torch: imported when a dump is configured, not for --help
        from ..format.draws import DRAWS
        from ..format.head import HEAD_DTYPES

        return [
            ("logits" not in self.hidden and len(set(self.hidden)) == len(self.hidden),
             "hidden names must be distinct module names"),
            (self.logits_dtype in DTYPES, f"logits_dtype: dtype {self.logits_dtype!r} is not one of {', '.join(DTYPES)}"),
            (self.hidden_dtype in DTYPES, f"hidden_dtype: dtype {self.hidden_dtype!r} is not one of {', '.join(DTYPES)}"),
            (self.topk is None or self.sample_k is None, "topk and sample_k are two ways to store the logits: choose one"),
            (self.topk is None or self.topk >= 1, "topk must be >= 1"),
            (self.sample_k is None or 1 <= self.sample_k <= 65535, "sample_k must be within [1, 65535]"),
            (self.sample_temperature > 0, "sample_temperature must be > 0"),
            (self.tail_samples is None or self.topk is not None,
             "tail_samples draws the classes outside a top-k head: give topk too"),
            (self.tail_samples is None or 1 <= self.tail_samples <= 65535, "tail_samples must be within [1, 65535]"),
            (self.sample_draws in DRAWS, f"sample_draws must be one of {', '.join(DRAWS)}"),
            (self.sample_draws == "iid" or self.sample_k is not None or self.tail_samples is not None,
             "sample_draws chooses how sample_k or tail_samples draw: give one of them"),
            (self.head is None or not self.sparse, "head and topk/sample_k are ways to store the logits: choose one"),
            (self.head != "", "head must name the teacher's output module"),
            (self.head_dtype in HEAD_DTYPES, f"head_dtype must be one of {', '.join(HEAD_DTYPES)}"),
            (self.head_dtype == "float16" or self.head is not None, "head_dtype is the dtype of --head's input: give "
                                                                    "head too"),
            (self.topk is None or self.topk <= 1 << 31, "topk must be <= 2^31"),
            (self.vocab_size is None or 1 <= self.vocab_size <= 1 << 31, "vocab_size must be within [1, 2^31]"),
            (self.views is None or 1 <= self.views <= 1 << 20, "views must be within [1, 2^20]"),
            (self.seed is None or self.seed >= 0, "seed must be >= 0"),
            (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}"),
            (DEVICE.fullmatch(self.device) is not None, "device must be auto, cpu, cuda or cuda:N"),
            (1 <= self.batch_size <= MAX_BATCH, f"batch_size must be within [1, {MAX_BATCH}]"),
            (0 <= self.num_workers <= MAX_WORKERS, f"num_workers must be within [0, {MAX_WORKERS}]"),
            (self.block_rows is None or 1 <= self.block_rows <= MAX_BATCH,
             f"block_rows must be within [1, {MAX_BATCH}]"),
            (1 <= self.writer_threads <= MAX_WORKERS, f"writer_threads must be within [1, {MAX_WORKERS}]"),
            (self.layout in ("auto", "packed", "padded"), "layout must be auto, packed or padded"),
            (not (self.repair and self.overwrite), "repair and overwrite exclude each other: repair keeps the "
                                                   "cache's good blocks, overwrite replaces it"),
        ]

    def fingerprint_inputs(self, amp: str, explicit_params: bool) -> dict[str, Any]:
        """The output choices hashed into the fingerprint, with ``amp`` resolved for the device
        and ``explicit_params`` telling whether the dataset records its augmentation.

        Kept exactly as earlier releases computed them, so their caches stay cache hits;
        settings added since enter only when they differ from their default.
        """
        choices: dict[str, Any] = {"output_key": self.output_key, "hidden": list(self.hidden),
                                   "logits_dtype": self.logits_dtype, "hidden_dtype": self.hidden_dtype, "amp": amp}
        if self.views is not None:
            choices.update(views=self.views, seed=self.seed or 0, explicit_params=explicit_params)
        if self.topk is not None or self.sample_k is not None or self.vocab_size is not None:
            choices.update(topk=self.topk, sample_k=self.sample_k, sample_temperature=self.sample_temperature,
                           vocab_size=self.vocab_size, seed=self.seed)
        if self.mask_key != DEFAULT_MASK_KEY:
            choices["mask_key"] = self.mask_key
        if self.tail_samples is not None:
            choices["tail_samples"] = self.tail_samples
        if self.sample_draws != "iid":
            choices["sample_draws"] = self.sample_draws
        if self.head is not None:
            choices.update(head=self.head, head_dtype=self.head_dtype, vocab_size=self.vocab_size)
        return choices

    def codec(self, name: str, classes: int, head: Any = None) -> Codec:
        """The codec of output ``name`` (``logits`` or a hidden module) with ``classes`` columns;
        ``head`` is the teacher's output layer (an ``nn.Linear``) for a head cache."""
        from ..format.codecs import DenseCodec
        from ..format.head import HeadCodec
        from ..format.sparse import HybridCodec, SampledCodec, TopKCodec

        if name != "logits":
            return DenseCodec(self.hidden_dtype)
        vocab = self.vocab_size or classes
        if vocab > classes:
            raise KdcacheError(f"{option('vocab_size', vocab)} is larger than the teacher's {classes} output classes")
        if self.head is not None:
            return HeadCodec(head.in_features, vocab, self.head_dtype, str(head.weight.dtype).removeprefix("torch."),
                             head.bias is not None)
        if self.topk is not None and self.tail_samples is not None:
            return HybridCodec(self.topk, self.tail_samples, vocab, self.sample_temperature, self.seed or 0,
                               self.sample_draws)
        if self.topk is not None:
            return TopKCodec(self.topk, vocab)
        if self.sample_k is not None:
            return SampledCodec(self.sample_k, vocab, self.sample_temperature, self.seed or 0, self.sample_draws)
        return DenseCodec(self.logits_dtype)

    @property
    def sparse(self) -> bool:
        return self.topk is not None or self.sample_k is not None


