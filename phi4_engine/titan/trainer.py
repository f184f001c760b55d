"""Drive torchtitan's Trainer from plain engine objects (no spec or plugin types in here).

``LMJob`` is what a stage hands over: model shape, optimizer and schedule numbers, where to
write, and a ``make_loader`` callback that returns the engine's own (stateful) batch iterator.
``run_lm`` builds ``Trainer.Config`` from it, trains, and tears the process group down so the
next stage in the same process can start its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.tools.logging import logger as titan_logger
from torchtitan.trainer import Trainer

from phi4_engine import checkpoints, plan
from phi4_engine.choices import Layout
from phi4_engine.errors import CheckpointError, EngineError, NonFiniteError
from phi4_engine.rundir import atomic_write
from phi4_engine.titan import attention, layouts, phi4, safe_metadata


class EngineTokenizer(BaseTokenizer):
    """Hands the engine's tokenizer object to torchtitan (which only asks for sizes/eos)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        tokenizer: Any = None

    def __init__(self, config: Config, **_: Any) -> None:
        super().__init__()
        self.inner = config.tokenizer
        self.eos_id = config.tokenizer.eos_id

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int], *args: Any, **kwargs: Any) -> str:
        return self.inner.decode(ids)

    def get_vocab_size(self) -> int:
        return self.inner.vocab_size


class EngineDataLoader(BaseDataLoader):
    """Wraps the engine's stateful loader; its state travels inside torchtitan's DCP checkpoint."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        make_loader: Any = None  # (dp_rank, dp_world_size, seq_len, batch_size) -> loader

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        seq_len: int,
        local_batch_size: int,
        **_: Any,
    ) -> None:
        self.loader = config.make_loader(dp_rank, dp_world_size, seq_len, local_batch_size)
        self.dp_rank = dp_rank

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return iter(self.loader)

    # The loader's state (ints and int lists) travels as JSON bytes: DCP loads tensors in place,
    # so a variable-length token buffer cannot be a tensor, and JSON needs no unpickling. The
    # engine's loaders keep a GLOBAL state (the same on every data-parallel rank: the whole
    # stream's position), saved once under one key, so a checkpoint loads under any
    # data-parallel degree and continues the same global sample sequence.
    def state_dict(self) -> dict[str, Any]:
        return {"global": orjson.dumps(self.loader.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.loader.load_state_dict(orjson.loads(state_dict["global"]))


@dataclass(kw_only=True)
class LMJob:
    """Everything an LM stage (pretrain, midtrain, sft) needs from torchtitan."""

    dump_folder: str
    flavor: str
    vocab_size: int
    rope_theta: float
    seq_len: int
    steps: int
    batch_size: int
    lr: float
    make_loader: Callable[[int, int, int, int], Any]
    tokenizer: Any
    seed: int = 0
    warmup_steps: int = 0
    decay_type: str = "cosine"  # "cosine" | "linear" | "none"
    min_lr_factor: float = 0.1
    layout: Layout = Layout()
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_norm: float = 1.0
    checkpoint_interval: int = 100
    keep_latest_k: int = 2
    on_corrupt: str = "fail"  # "fail" | "previous": what a checkpoint failing its manifest does
    init_weights_from: str | None = None
    global_batch_size: int = -1
    attention: str = "sdpa"
    on_start: Callable[[int], None] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None


@dataclass
class LMResult:
    step: int
    tokens: int
    final_checkpoint: str
    weights_sha256: str
    init_weights_sha256: str | None


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers, in name order (full tensors)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


class Phi4Trainer(Trainer):
    """torchtitan's Trainer with the engine's step/checkpoint callbacks and its integrity rules:

    * every saved checkpoint is committed with a sha256 manifest (:mod:`phi4_engine.checkpoints`);
      resume and the stage handoff load only committed, verified checkpoints; retention counts
      committed ones only (torchtitan's own purge is off: it counts any ``step-N`` folder);
    * a NaN/inf loss or gradient stops every rank before the optimizer step, with a diagnostic
      record (``nonfinite.json``) and :class:`NonFiniteError`;
    * each step's metrics carry ``batch``: a digest of the step's input ids and labels (this
      rank's share), so runs and resumes can be compared sample for sample.
    """

    on_start: Callable[[int], None] | None = None
    on_step: Callable[[int, dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None
    init_weights_sha256: str | None = None
    keep_latest_k: int = 0
    on_corrupt: str = "fail"

    def __init__(self, config: Trainer.Config) -> None:
        super().__init__(config)
        log = self.metrics_processor.log
        self._batch_digest = hashlib.sha256()
        self._step_losses: list[torch.Tensor] = []

        def log_and_report(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)
            if self.on_step is not None:
                metrics: dict[str, Any] = {"loss": float(global_avg_loss), "grad_norm": float(grad_norm)}
                for key, value in (extra_metrics or {}).items():
                    metrics[key] = float(value)
                metrics["batch"] = self._batch_digest.hexdigest()[:16]
                self.on_step(step, metrics)

        self.metrics_processor.log = log_and_report

        # The non-finite guard sits between torchtitan's gradient clipping and the optimizer
        # step: wrapping the two calls keeps torchtitan's train_step as it is.
        optimizer_step = self.optimizers.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            self._stop_if_nonfinite()
            return optimizer_step(*args, **kwargs)

        self.optimizers.step = guarded_step
        forward_backward = self.forward_backward_step

        def recorded(**kwargs: Any) -> torch.Tensor:
            loss = forward_backward(**kwargs)
            self._step_losses.append(loss.detach())
            return loss

        self.forward_backward_step = recorded

    # -- Packed documents: attention masks from the loader's ``positions`` ---------------------
    # torchtitan builds masks only for Flex/Varlen; add them for our SDPA backend (and plain
    # causal positions for Flex/Varlen when the loader gives none) before its own processing.
    def post_dataloading_process(self, input_dict, labels):
        input_dict = attention.prepare_attention_inputs(self.model_config, input_dict)
        return super().post_dataloading_process(input_dict, labels)

    def batch_generator(self, data_iterable):
        for input_dict, labels in super().batch_generator(data_iterable):
            self._batch_digest.update(input_dict["input"].contiguous().numpy().tobytes())
            self._batch_digest.update(labels.contiguous().numpy().tobytes())
            yield input_dict, labels

    def train(self) -> None:
        config = self.config
        resume_step = self._committed_resume_step()
        if resume_step == 0 and config.checkpoint.initial_load_path:
            self._verify(config.checkpoint.initial_load_path)
        try:
            self.checkpointer.load(step=resume_step if resume_step else -1)
        except (Exception, DcpCheckpointException, safe_metadata.ForeignPickle) as exc:
            cause = _root_cause(exc)
            if isinstance(cause, safe_metadata.ForeignPickle):
                raise safe_metadata.as_checkpoint_error(cause) from None
            if isinstance(cause, EngineError):
                raise cause from None
            raise
        if config.checkpoint.initial_load_path:
            # The stage handoff: the ledger proves these are the previous stage's final weights.
            # Hashed when the stage starts; a resumed stage reads what its start recorded.
            record = Path(config.dump_folder) / "init-weights.json"
            if self.step == 0:
                self.init_weights_sha256 = weights_sha256(self.model_parts[0])
                if dist.get_rank() == 0:
                    atomic_write(record, orjson.dumps({"checkpoint": config.checkpoint.initial_load_path,
                                                       "weights_sha256": self.init_weights_sha256}))  # fmt: skip
            elif record.exists():
                self.init_weights_sha256 = orjson.loads(record.read_bytes())["weights_sha256"]
        if self.on_start is not None:
            self.on_start(self.step)
        data_iterator = self.batch_generator(self.dataloader)
        while self.step < config.training.steps:
            self.step += 1
            self.gc_handler.run(self.step)
            self._batch_digest = hashlib.sha256()
            self._step_losses = []
            self.train_step(data_iterator)
            last = self.step == config.training.steps
            path = os.path.join(self.checkpointer.folder, f"step-{self.step}")
            if self._save(path, last):
                self._commit(path)
                if dist.get_rank() == 0:
                    checkpoints.purge(self.checkpointer.folder, self.keep_latest_k)
                if self.on_checkpoint is not None:
                    self.on_checkpoint(self.step, path)

    # -- checkpoint integrity ------------------------------------------------------------------

    def _save(self, path: str, last: bool) -> bool:
        """torchtitan's save; a failed write (disk full, permissions…) becomes one line naming
        the folder and the cause. The half-written folder has no manifest, so it never counts."""
        try:
            saved = self.checkpointer.save(self.step, last_step=last)
            self.checkpointer.maybe_wait_for_saving()
            return saved
        except (Exception, DcpCheckpointException) as exc:  # DCP's is a BaseException
            cause = _root_cause(exc)
            # DCP raises on every rank once all writes have ended. The torn folder has no manifest
            # and can never be loaded; on a full disk its shards hold the space that the ledger
            # and the error report need, so it goes (kept torn folders are a kill's, not this).
            if dist.get_rank() == 0:
                shutil.rmtree(path, ignore_errors=True)
            committed = [p for p in checkpoints.step_dirs(self.checkpointer.folder).values() if checkpoints.is_committed(p)]
            resume = committed[-1].name if committed else "the stage's start"
            raise CheckpointError(
                f"could not write checkpoint {path}: {type(cause).__name__}: {cause}{_disk_full(cause, committed)}; "
                f"nothing was marked complete, a rerun resumes from {resume} once the cause is fixed"
            ) from exc

    def _my_share(self, files: list[str]) -> list[str]:
        """This rank's files to hash: round-robin over the sorted list (all ranks share a disk)."""
        return files[dist.get_rank():: dist.get_world_size()]

    def _commit(self, path: str) -> None:
        """Write the manifest of the checkpoint just saved: each rank hashes a share of the files."""
        dist.barrier()  # every rank's files are on disk before any rank lists them
        files = checkpoints.checkpoint_files(path)
        entries = checkpoints.hash_files(path, self._my_share(files))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
        if dist.get_rank() == 0:
            merged = {name: entry for part in gathered for name, entry in part.items()}
            checkpoints.write_manifest(path, self.step, merged)
        dist.barrier()

    def _problems(self, path: str) -> list[str]:
        """Manifest problems of the checkpoint at ``path``, its files checked by all ranks in shares."""
        try:
            manifest = checkpoints.read_manifest(path)
        except CheckpointError as exc:
            return [str(exc)]
        if manifest is None:
            return checkpoints.problems(path)  # the same one line on every rank
        found = checkpoints.problems(path, self._my_share(sorted(manifest["files"])))
        if dist.get_rank() == 0:
            found += checkpoints.unlisted(path, manifest)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, found)
        return sorted(p for part in gathered for p in part)

    def _verify(self, path: str) -> None:
        found = self._problems(path)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise CheckpointError(f"corrupt checkpoint: {found[0]}{more}; refusing to load it")

    def _committed_resume_step(self) -> int:
        """The newest committed, intact checkpoint of this stage (0: none, start fresh).

        Folders without a manifest (a save killed half-way) are quarantined. A committed one
        failing its manifest stops the run (``on_corrupt: fail``) or is quarantined in favour
        of the one before (``previous``). Nothing is deleted.
        """
        folder = self.checkpointer.folder
        if dist.get_rank() == 0:
            for step, path in checkpoints.step_dirs(folder).items():
                if not checkpoints.is_committed(path):
                    moved = checkpoints.quarantine(path, "incomplete")
                    _say(f"checkpoint step-{step} was never completed (the run stopped while writing it); moved to {moved}")
        dist.barrier()
        for step, path in reversed(list(checkpoints.step_dirs(folder).items())):
            found = self._problems(str(path))
            if not found:
                return step
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            if self.on_corrupt != "previous":
                raise CheckpointError(
                    f"corrupt checkpoint: {found[0]}{more}; refusing to resume from it "
                    '(checkpoint.on_corrupt: "previous" would fall back to the one before)'
                )
            if dist.get_rank() == 0:
                moved = checkpoints.quarantine(path, "corrupt")
                _say(f"checkpoint step-{step} is corrupt: {found[0]}{more}; moved to {moved}, trying the one before")
            dist.barrier()
        return 0

    # -- non-finite guard ----------------------------------------------------------------------

    def _stop_if_nonfinite(self) -> None:
        grads = [_local(p.grad) for m in self.model_parts for p in m.parameters() if p.grad is not None]
        checks = [torch.stack(torch._foreach_norm(grads)).isfinite().all()] if grads else []
        checks += [loss.isfinite().all() for loss in self._step_losses]
        bad = torch.tensor(0.0 if all(bool(c) for c in checks) else 1.0, device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self._report_nonfinite()

    def _report_nonfinite(self) -> None:
        named = [(n, _local(p.grad)) for m in self.model_parts for n, p in m.named_parameters() if p.grad is not None]
        mine = {
            "rank": dist.get_rank(),
            "batch": self._batch_digest.hexdigest()[:16],
            "loss": [_json_float(float(loss.sum())) for loss in self._step_losses],
            "nonfinite_grads": [n for n, g in named if not bool(g.isfinite().all())][:20],
        }
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        committed = [s for s, p in checkpoints.step_dirs(self.checkpointer.folder).items() if checkpoints.is_committed(p)]
        resume = f"step-{committed[-1]}" if committed else "the stage's start"
        path = os.path.join(self.config.dump_folder, "nonfinite.json")
        if dist.get_rank() == 0:
            record = {"step": self.step, "ranks": ranks, "resumes_from": resume}
            atomic_write(Path(path), orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        raise NonFiniteError(
            f"non-finite loss or gradient at step {self.step} (batch {ranks[0]['batch']}); every rank stopped "
            f"before the optimizer step; details in {path}; a rerun resumes from {resume}"
        )


def _root_cause(exc: BaseException) -> BaseException:
    """The exception behind DCP's wrappers (``CheckpointException`` holds one per rank)."""
    cause = exc
    while cause.__cause__ is not None or getattr(cause, "failures", None):
        failures = getattr(cause, "failures", None)
        cause = next(iter(failures.values())) if failures else cause.__cause__
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback summary)
    return cause


def _disk_full(cause: BaseException, committed: list[Path]) -> str:
    """`` (the disk is full: …)`` when it is: torch's serializer reports a short write as
    "unexpected pos", not ENOSPC, so the free space is also compared with the last committed
    checkpoint's size (from its manifest)."""
    enospc = getattr(cause, "errno", None) == errno.ENOSPC
    if not committed:
        return " (the disk is full)" if enospc else ""
    free = shutil.disk_usage(committed[-1]).free
    needed = sum(entry["size"] for entry in checkpoints.read_manifest(committed[-1])["files"].values())
    if not enospc and free >= needed:
        return ""
    return f" (the disk is full: {free / 1e6:.1f} MB free, the last checkpoint took {needed / 1e6:.1f} MB)"


def _json_float(value: float) -> float | str:
    """A float JSON can hold: NaN and ±inf as the strings "nan", "inf", "-inf" (not null)."""
    return value if math.isfinite(value) else str(value)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"phi4-engine: {message}", file=sys.stderr)


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """The process group torchtitan expects, for a run under torchrun or in a plain process.

    Under torchrun (WORLD_SIZE set) torchtitan initializes it from the environment. A plain
    process gets a world of one on an in-memory store: no TCP port to pick or collide on (tests
    and notebooks run many stages, sometimes side by side). torchtitan skips its own init when
    a group exists. The variables torchtitan reads are set only for the duration of the run.
    """
    if "WORLD_SIZE" in os.environ:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def trainer_config(job: LMJob) -> Trainer.Config:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    numbers = plan.model_numbers(job.flavor, job.vocab_size)
    try:
        layout = layouts.resolve(job.layout, world_size, numbers.n_layers * numbers.layer_params + 2 * numbers.vocab * numbers.dim)
        layouts.check_tensor_parallel(layout, numbers.n_heads, numbers.n_kv_heads, job.flavor)
    except ValueError as exc:
        raise EngineError(f"parallelism: {exc}") from None
    local_batch = job.batch_size
    dp = layout.dp_replicate * layout.dp_shard
    if job.global_batch_size > 0 and local_batch * dp > job.global_batch_size:
        # No micro batch given: the global batch is split over the data-parallel ranks.
        if job.global_batch_size % dp:
            raise EngineError(f"batch_size {job.global_batch_size} does not split over {dp} data-parallel ranks")
        local_batch = job.global_batch_size // dp
    spec = phi4.model_spec(
        job.flavor,
        vocab_size=job.vocab_size,
        rope_theta=job.rope_theta,
        max_seq_len=job.seq_len,
        attention=job.attention,
        converters=layouts.converters(layout),
    )
    checkpoint = CheckpointManager.Config(
        enable=True,
        folder="checkpoints",
        interval=job.checkpoint_interval,
        keep_latest_k=0,  # retention is the engine's (Phi4Trainer): it counts committed checkpoints only
        last_save_model_only=False,
        initial_load_path=job.init_weights_from,
        initial_load_model_only=True,
    )
    config = Trainer.Config(
        model_spec=spec,
        dump_folder=job.dump_folder,
        tokenizer=EngineTokenizer.Config(tokenizer=job.tokenizer),
        dataloader=EngineDataLoader.Config(make_loader=job.make_loader),
        loss=CrossEntropyLoss.Config(global_vocab_size=job.vocab_size),
        optimizer=default_adamw(lr=job.lr, weight_decay=job.weight_decay, betas=job.betas),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=job.warmup_steps,
            # "none" = constant: a linear decay from 1 to 1.
            decay_type="linear" if job.decay_type == "none" else job.decay_type,
            min_lr_factor=1.0 if job.decay_type == "none" else job.min_lr_factor,
        ),
        training=TrainingConfig(
            local_batch_size=local_batch,
            global_batch_size=job.global_batch_size,
            seq_len=job.seq_len,
            steps=job.steps,
            max_norm=job.max_norm,
            disable_cuda_graphs=True,
        ),
        # partial_dtensor: the default spmd_types backend needs torch >= 2.14 FSDP2 (FACTS.md §5, fix 5).
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=checkpoint,
        metrics=MetricsProcessor.Config(log_freq=1, enable_tensorboard=False),
    )
    layouts.apply(config, layout)
    return config


def attach_job(trainer: Phi4Trainer, job: LMJob) -> Phi4Trainer:
    """Give ``trainer`` the job's callbacks and checkpoint rules (retention, corruption policy)."""
    trainer.on_start = job.on_start
    trainer.on_step = job.on_step
    trainer.on_checkpoint = job.on_checkpoint
    trainer.keep_latest_k = job.keep_latest_k
    trainer.on_corrupt = job.on_corrupt
    return trainer


def initial_weights(job: LMJob) -> torch.nn.Module:
    """The model a fresh stage of ``job`` starts from, as one CPU process initializes it:
    ``torch.manual_seed(seed)``, built on the meta device, materialized on CPU, initialized
    (bit for bit the weights torchtitan gives a one-process CPU run: a test holds it)."""
    torch.manual_seed(job.seed)
    spec = phi4.model_spec(job.flavor, vocab_size=job.vocab_size, rope_theta=job.rope_theta, max_seq_len=job.seq_len,
                           attention=job.attention)  # fmt: skip
    with torch.device("meta"):
        model = spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def seed_checkpoint(job: LMJob) -> str:
    """``<stage>/seed-checkpoint``: the initial weights, made once by rank 0 and loaded by every
    rank. Why: under several processes torchtitan draws each rank's shard from a DTensor RNG
    (offsets per rank), so a fresh stage would start from other weights than with one process;
    with the seed checkpoint a run starts from the same weights under any world size (this is
    torchtitan's own recipe for reproducible initialization, ``create_seed_checkpoint``)."""
    from phi4_engine.titan.generate import save_weights

    folder = Path(job.dump_folder).resolve() / "seed-checkpoint"
    if dist.get_rank() == 0 and not checkpoints.is_committed(folder):
        if folder.exists():
            shutil.rmtree(folder)  # torn by a kill: made again, identically
        save_weights(initial_weights(job).state_dict(), folder)
    dist.barrier()
    return str(folder)


def run_lm(job: LMJob) -> LMResult:
    with _process_group():
        return _run_lm(job)


def _run_lm(job: LMJob) -> LMResult:
    # torch warns that DTensor RNG "may not have complete support on cpu device mesh" when
    # torchtitan initializes weights on CPU; initialization is seeded and deterministic here.
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    titan_logger.setLevel(logging.ERROR)
    if job.init_weights_from is None and dist.get_world_size() > 1:
        job = dataclasses.replace(job, init_weights_from=seed_checkpoint(job))
    config = trainer_config(job)
    config.debug.seed = job.seed
    config.debug.deterministic = True
    trainer = attach_job(Phi4Trainer(config), job)
    try:
        trainer.train()
        return LMResult(
            step=trainer.step,
            # ntokens_seen counts this rank's share; tensor-parallel ranks share their batch.
            tokens=trainer.ntokens_seen * trainer.parallel_dims.dp_replicate * trainer.parallel_dims.dp_shard,
            final_checkpoint=os.path.join(trainer.checkpointer.folder, f"step-{trainer.step}"),
            weights_sha256=weights_sha256(trainer.model_parts[0]),
            init_weights_sha256=trainer.init_weights_sha256,
        )
    finally:
        trainer.close()


def stock_trainer_step_times(job: LMJob, warmup: int) -> list[float]:
    """Seconds per step of torchtitan's OWN ``Trainer`` (not the engine's subclass: no manifest,
    guard, digest or callbacks) on ``job``'s exact ``Trainer.Config`` — the baseline of
    ``bench/mfu.py``. Steps after ``warmup``; checkpointing off."""
    import time

    with _process_group():
        config = trainer_config(job)
        config.checkpoint.enable = False
        config.debug.seed = job.seed
        trainer = Trainer(config)
        stamps: list[float] = []
        step = trainer.train_step

        def timed(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return out

        trainer.train_step = timed
        try:
            trainer.train()
        finally:
            trainer.close()
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
