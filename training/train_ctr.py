"""Train a CiUBM CTR model (stage 3): DIN, content-as-feature or full CiUBM.

    accelerate launch training/train_ctr.py --config training/configs/ctr_ml100k_temporal_ciubm_csft.yaml
    python training/train_ctr.py --config ... --seed 1 --output-dir runs/ctr/seed1 [--resume]

Writes <output_dir>/config.json, checkpoints/, model/ (save_pretrained; the center is not copied)
and metrics.json (valid + test, overall and per popularity bucket).

Resuming, refusals, errors, several CPU processes: mim_hf.cli_support.STAGE_HELP (in --help).
"""

from mim_hf.cli_support import run_stage
from mim_hf.ctr.train import CTRTrainConfig, run

if __name__ == "__main__":
    run_stage(CTRTrainConfig, run, __doc__)
