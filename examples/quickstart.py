"""Five DASH steps on the built-in tiny task, on CPU in about 15 s; run from the repository root."""
import tempfile

from dash.config import load_config
from dash.rl.trainer import Trainer

cfg = load_config("configs/tiny.yaml", ["--train.steps=5", f"--log.out_dir={tempfile.mkdtemp()}"])
trainer = Trainer(cfg, quiet=True)
trainer.setup()  # loads the shipped SFT warm start, the task's prompts, the sampler and the optimizer
try:
    for _ in range(cfg.train.steps):  # one optimizer step: sample all 64x4, filter |A| <= 0.1, packed update
        m = trainer.train_step()
        print(f"step {trainer.step}: reward {m['rollout/reward_mean']:.3f}, kept {m['rollout/kept_frac']:.2f}, "
              f"{m['time/step_s']:.3f} s")
    print(f"held-out greedy accuracy {trainer.evaluate()['eval/heldout/greedy_acc']:.3f}")
finally:
    trainer.close()
