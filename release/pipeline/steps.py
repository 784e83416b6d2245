"""What a step of a build is, and what running it gave: the vocabulary the planner, the scheduler
and every executor share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from release.resources import Need

FAMILIES = ("safetensors", "gguf", "gptq")
_FORWARD_STEPS = ("reference", "imatrix")  # steps whose device only changes float rounding


@dataclass
class Step:
    name: str
    family: str  # safetensors | gguf | gptq | release (card/manifest/sign) | reference
    argv: list[str]
    settings: dict[str, Any]
    deps: list[str]
    outputs: Callable[[], list[Path]]  # what the step wrote, listed after it ran
    need: Need  # estimated peak RAM / GPU memory / disk, for the up-front fit check and --jobs
    ok_codes: tuple[int, ...] = (0,)  # validate: 1 (a failed check) is a result, not a crash
    env: dict[str, str] = field(default_factory=dict)  # set for its process (the build's hash cache)
    threads: int = 1  # its OMP_NUM_THREADS, whatever runs it (and a Ray task's CPU request)
    # Its outputs are only inputs of later steps (the shared lossless GGUF): run only when one of them
    # must run, removed when all of them have succeeded; they fingerprint its inputs, not its files.
    temporary: bool = False

    @property
    def memory(self) -> int:
        return self.need.ram

    def digest_argv(self) -> list[str]:
        """The arguments that define the result: ``--forward`` (resident or streamed, chosen from
        free memory) gives the same logits either way, so it does not make a step stale. Nor does
        the ``--device`` of a forward pass (reference, importance matrix, validation): its float32
        results on a GPU and a CPU agree to rounding, and a reference made once on a CPU runner must
        stay up to date for the GPU runner that builds GPTQ beside it (the release workflow). GPTQ's
        own ``--device`` stays: it changes the quantized integers."""
        ignored = {"--forward"} | ({"--device"} if self.name in _FORWARD_STEPS or self.name.startswith("validate-")
                                   else set())  # fmt: skip
        out, skip = [], False
        for a in self.argv[3:]:
            if skip:
                skip = False
                continue
            if a in ignored:
                skip = True
                continue
            out.append(a)
        return out


@dataclass
class StepResult:
    name: str
    status: str  # done | skipped | failed | blocked
    seconds: float = 0.0
    exit_code: int = 0
    output: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    peak_rss_bytes: int = 0  # of the step's process (wait4), 0 when it did not run
    log: str = ""  # its stderr, kept under DIST/.work/logs
    node: str = ""  # the machine it ran on (this one's host name, or a Ray node host/id)


@dataclass
class Plan:
    """A build's steps in order, and the variants they make (name, family, path, producing step,
    validating step)."""

    dist: Path
    steps: list[Step]
    variants: list[dict[str, Any]]
    # The families this build makes (``--only``): a build of one family leaves the others' files
    # and records alone, as another runner on a shared workspace may be making them.
    families: tuple[str, ...] = FAMILIES

    def waiting_on(self) -> dict[str, list[str]]:
        """Each step's name -> the steps that list it among their dependencies."""
        return {s.name: [r.name for r in self.steps if s.name in r.deps] for s in self.steps}
