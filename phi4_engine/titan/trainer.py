"""Drive torchtitan's Trainer from plain engine objects (no spec or plugin types in here).

``LMJob`` is what a stage hands over: model shape, optimizer and schedule numbers, where to
write, and a ``make_loader`` callback that returns the engine's own (stateful) batch iterator.
``run_lm`` builds ``Trainer.Config`` from it, trains, and tears the process group down so the
next stage in the same process can start its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import orjson
import torch
import torch.distributed as dist
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.tools.logging import logger as titan_logger
from torchtitan.trainer import Trainer

from phi4_engine.titan import attention, phi4


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
    # so a variable-length token buffer cannot be a tensor, and JSON needs no unpickling.
    def state_dict(self) -> dict[str, Any]:
        return {f"dp_rank_{self.dp_rank}": orjson.dumps(self.loader.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.loader.load_state_dict(orjson.loads(state_dict[f"dp_rank_{self.dp_rank}"]))


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
    dp_shard: int = -1
    tp: int = 1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_norm: float = 1.0
    checkpoint_interval: int = 100
    keep_latest_k: int = 2
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
    """torchtitan's Trainer with the engine's step/checkpoint callbacks and no end-of-run sleep."""

    on_start: Callable[[int], None] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None
    init_weights_sha256: str | None = None

    def __init__(self, config: Trainer.Config) -> None:
        super().__init__(config)
        log = self.metrics_processor.log

        def log_and_report(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)
            if self.on_step is not None:
                metrics = {"loss": float(global_avg_loss), "grad_norm": float(grad_norm)}
                for key, value in (extra_metrics or {}).items():
                    metrics[key] = float(value)
                self.on_step(step, metrics)

        self.metrics_processor.log = log_and_report

    # -- Packed documents: attention masks from the loader's ``positions`` ---------------------
    # torchtitan builds masks only for Flex/Varlen; add them for our SDPA backend (and plain
    # causal positions for Flex/Varlen when the loader gives none) before its own processing.
    def post_dataloading_process(self, input_dict, labels):
        input_dict = attention.prepare_attention_inputs(self.model_config, input_dict)
        return super().post_dataloading_process(input_dict, labels)

    def train(self) -> None:
        config = self.config
        self.checkpointer.load(step=config.checkpoint.load_step)
        if self.step == 0 and config.checkpoint.initial_load_path:
            # The stage handoff: the ledger proves these are the previous stage's final weights.
            self.init_weights_sha256 = weights_sha256(self.model_parts[0])
        if self.on_start is not None:
            self.on_start(self.step)
        data_iterator = self.batch_generator(self.dataloader)
        while self.step < config.training.steps:
            self.step += 1
            self.gc_handler.run(self.step)
            self.train_step(data_iterator)
            last = self.step == config.training.steps
            self.checkpointer.save(self.step, last_step=last)
            if self.on_checkpoint is not None and (last or self.step % config.checkpoint.interval == 0):
                self.checkpointer.maybe_wait_for_staging()
                self.on_checkpoint(self.step, os.path.join(self.checkpointer.folder, f"step-{self.step}"))
        self._purge_after_last_save()

    def _purge_after_last_save(self) -> None:
        """Apply keep_latest_k once more: torchtitan's last-step save does not purge, so k+1
        checkpoints would remain. Only complete checkpoints (with .metadata) count as newest."""
        keep = self.config.checkpoint.keep_latest_k
        folder = self.checkpointer.folder
        if keep <= 0 or dist.get_rank() != 0 or not os.path.isdir(folder):
            return
        self.checkpointer.maybe_wait_for_saving()
        steps = sorted(
            int(name.split("-", 1)[1])
            for name in os.listdir(folder)
            if name.startswith("step-") and name.split("-", 1)[1].isdigit()
            and os.path.exists(os.path.join(folder, name, ".metadata"))
        )
        for step in steps[:-keep]:
            shutil.rmtree(os.path.join(folder, f"step-{step}"), ignore_errors=True)


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
    spec = phi4.model_spec(
        job.flavor,
        vocab_size=job.vocab_size,
        rope_theta=job.rope_theta,
        max_seq_len=job.seq_len,
        attention=job.attention,
    )
    checkpoint = CheckpointManager.Config(
        enable=True,
        folder="checkpoints",
        interval=job.checkpoint_interval,
        keep_latest_k=job.keep_latest_k,
        last_save_model_only=False,
        initial_load_path=job.init_weights_from,
        initial_load_model_only=True,
    )
    return Trainer.Config(
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
            local_batch_size=job.batch_size,
            global_batch_size=job.global_batch_size,
            seq_len=job.seq_len,
            steps=job.steps,
            max_norm=job.max_norm,
            disable_cuda_graphs=True,
            mixed_precision_param="float32",
        ),
        # partial_dtensor: the default spmd_types backend needs torch >= 2.14 FSDP2 (FACTS.md §5, fix 5).
        parallelism=ParallelismConfig(
            spmd_backend="partial_dtensor",
            data_parallel_shard_degree=job.dp_shard,
            tensor_parallel_degree=job.tp,
        ),
        checkpoint=checkpoint,
        metrics=MetricsProcessor.Config(log_freq=1, enable_tensorboard=False),
        activation_checkpoint=None,
    )


def run_lm(job: LMJob) -> LMResult:
    with _process_group():
        return _run_lm(job)


def _run_lm(job: LMJob) -> LMResult:
    # torch warns that DTensor RNG "may not have complete support on cpu device mesh" when
    # torchtitan initializes weights on CPU; initialization is seeded and deterministic here.
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    titan_logger.setLevel(logging.ERROR)
    config = trainer_config(job)
    config.debug.seed = job.seed
    config.debug.deterministic = True
    trainer = Phi4Trainer(config)
    trainer.on_start = job.on_start
    trainer.on_step = job.on_step
    trainer.on_checkpoint = job.on_checkpoint
    try:
        trainer.train()
        return LMResult(
            step=trainer.step,
            tokens=trainer.ntokens_seen,
            final_checkpoint=os.path.join(trainer.checkpointer.folder, f"step-{trainer.step}"),
            weights_sha256=weights_sha256(trainer.model_parts[0]),
            init_weights_sha256=trainer.init_weights_sha256,
        )
    finally:
        trainer.close()
