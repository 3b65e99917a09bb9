"""Train a CiUBM CTR model (stage 3): DIN, content-as-feature or full CiUBM.

    accelerate launch training/train_ctr.py --config training/configs/ctr_ml100k_temporal_ciubm_csft.yaml
    python training/train_ctr.py --config ... --seed 1 --output-dir runs/ctr/seed1 [--resume]

Writes <output_dir>/config.json, checkpoints/, model/ (save_pretrained; the center is not copied)
and metrics.json (valid + test, overall and per popularity bucket).

--resume continues from the newest intact checkpoint under OUTPUT_DIR/checkpoints (exactly:
same metrics and weights as an uninterrupted run; no pickle is loaded; a changed configuration
is refused). Without it, a run refuses a folder that holds an earlier run's checkpoints; a
second run into a folder in use is refused too. See docs/training.md.

A missing input folder is named with the command that makes it; errors are one line
(--debug: the traceback). For N processes on CPU: ACCELERATE_USE_CPU=true torchrun
--nproc_per_node N training/train_ctr.py ... (see docs/cli.md).
"""

from mim_hf.cli_support import run_stage
from mim_hf.ctr.train import CTRTrainConfig, run

if __name__ == "__main__":
    run_stage(CTRTrainConfig, run, __doc__)
