"""Stage 1: pre-train the content encoder (domain adaptation + modal alignment) with LoRA.

    accelerate launch training/pretrain.py --config training/configs/pretrain_ml100k.yaml \
        --data-dir data/ml100k/temporal --output-dir runs/pretrain
    python training/pretrain.py --config training/configs/pretrain_ml100k.yaml --resume ...

Writes OUTPUT_DIR/encoder (merged encoder + processor), adapters/, checkpoints/, metrics.json.

--resume continues from the newest intact checkpoint under OUTPUT_DIR/checkpoints (exactly:
same metrics and weights as an uninterrupted run; no pickle is loaded; a changed configuration
is refused). Without it, a run refuses a folder that holds an earlier run's checkpoints; a
second run into a folder in use is refused too. See docs/training.md.

A missing input folder is named with the command that makes it; errors are one line
(--debug: the traceback). For N processes on CPU: ACCELERATE_USE_CPU=true torchrun
--nproc_per_node N training/pretrain.py ... (see docs/cli.md).
"""

from mim_hf.cli_support import run_stage
from mim_hf.pretrain.train import PretrainConfig, run

if __name__ == "__main__":
    metrics = run_stage(PretrainConfig, run, __doc__)
    print({"alignment": {k: metrics["alignment"][k] for k in ("task", "before", "after")},
           "timings_s": metrics["timings_s"]})
