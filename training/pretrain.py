"""Stage 1: pre-train the content encoder (domain adaptation + modal alignment) with LoRA.

    accelerate launch training/pretrain.py --config training/configs/pretrain_ml100k.yaml \
        --data-dir data/ml100k/temporal --output-dir runs/pretrain
    python training/pretrain.py --config training/configs/pretrain_ml100k.yaml --resume ...

Writes OUTPUT_DIR/encoder (merged encoder + processor), adapters/, checkpoints/, metrics.json.

Resuming, refusals, errors, several CPU processes: mim_hf.cli_support.STAGE_HELP (in --help).
"""

from mim_hf.cli_support import run_stage
from mim_hf.pretrain.train import PretrainConfig, run

if __name__ == "__main__":
    metrics = run_stage(PretrainConfig, run, __doc__)
    print({"alignment": {k: metrics["alignment"][k] for k in ("task", "before", "after")},
           "timings_s": metrics["timings_s"]})
