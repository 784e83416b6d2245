"""`model-release build`: a release file -> a verified, licensed, signed release, resumably.

The pipeline is the flow of the single commands, each step one ``model-release`` command run in
its own process (so memory is returned after each step, steps run in parallel with ``--jobs``, and
a crash or ``kill -9`` takes down one step, not the build):

    check -> convert -> gguf-<TYPE>... ------------------+-> validate-<variant>... -> card -> manifest -> sign
                     -> lossless-gguf -> gguf-<K-QUANT>... |
          -> imatrix -----------------^                    |
          -> reference ------------------------------------|
          -> gptq -----------------------------------------+

Every step records, in ``DIST/.steps/<step>.json`` (written atomically after the step succeeds),
the hash of its inputs (its settings plus the fingerprints of what it consumed) and the size and
mtime of each file it wrote. A rerun skips a step whose record matches; anything else is redone,
and so is everything downstream, because downstream inputs include upstream fingerprints. Each
command writes atomically, so an interrupted step leaves no finished-looking output, and its
record is missing, so the rerun redoes exactly that step.

The rooms, in the order a build walks them:

- ``release_file``: the release file, checked against its schema, with its licenses decided;
- ``steps``: what a step is (argv, settings, dependencies, resource need) and what running it gave;
- ``plan``: release file -> steps, one planner per family, and the up-front fit check;
- ``records``: the per-step records that make a rerun skip what is done;
- ``schedule``: the executor-neutral loop (dependencies, skips, blocking, the memory budget);
- ``local``: the executor that runs a step as a local process (``--jobs N``);
- ``ray_executor``: the executor that runs a step as a Ray task on a cluster's node (``--executor
  ray``): the same calls, ``start``, ``poll`` and ``stop``, plus the node fit and shared-storage checks;
- ``build``: the whole of ``model-release build``, ``--dry-run``'s preview, and the final table's rows.

The k-quant and IQ steps read one lossless GGUF per build (``lossless-gguf``, a temporary step: run
only when one of its readers must run, removed when all have succeeded; or the release's own
F16/BF16 variant).
"""

from release.pipeline.build import BuildResult, build
from release.pipeline.plan import Plan, check_fits, plan_build
from release.pipeline.records import STEPS_DIR, WORK_DIR, Records
from release.pipeline.release_file import ReleaseFile, load_release_file
from release.pipeline.steps import FAMILIES, Step, StepResult

__all__ = [
    "FAMILIES",
    "STEPS_DIR",
    "WORK_DIR",
    "BuildResult",
    "Plan",
    "Records",
    "ReleaseFile",
    "Step",
    "StepResult",
    "build",
    "check_fits",
    "load_release_file",
    "plan_build",
]
