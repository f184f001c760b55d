"""Drive torchtitan's Trainer from plain engine objects (no spec or plugin types in here).

``LMJob`` is what a stage hands over: model shape, optimizer and schedule numbers, where to
write, and a ``make_loader`` callback that returns the engine's own (stateful) batch iterator.
``run_lm`` builds ``Trainer.Config`` from it, trains, and tears the process group down so the
next stage in the same process can start its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
from dataclasses import dataclass, field
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

from phi4_engine.titan import phi4


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


@dataclass
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
    shape_overrides: dict[str, Any] = field(default_factory=dict)
    on_start: Callable[[int], None] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None


@dataclass
class LMResult:
    step: int
    tokens: int
    final_checkpoint: str
    weights_sha256: str


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

    def train(self) -> None:
        config = self.config
        self.checkpointer.load(step=config.checkpoint.load_step)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_single_process_env() -> None:
    """torchtitan reads torchrun's variables; a plain `python` process gets world size 1."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


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
    _ensure_single_process_env()
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
        )
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
