"""DDP through Lightning's own strategy on CPU: two ranks train the same registers, one export is written."""

import subprocess
import sys
import textwrap

import timm
import torch
from safetensors.torch import load_file

from retrofit import add_registers, load

# Lightning's "ddp" launcher re-runs the calling script for each rank, so the run lives in its own script.
SCRIPT = textwrap.dedent("""
    import os, sys
    import timm
    import torch
    from safetensors.torch import save_file
    from retrofit import retrofit, synthetic_images
    from retrofit.targets import TargetSettings

    out = sys.argv[1]
    torch.manual_seed(0)
    teacher = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8).eval()
    images = synthetic_images(8, 48, seed=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = retrofit(
        teacher, images, out_dir=out + "/export", max_steps=3, batch_size=2, random_crop=False, shuffle=False,
        lr=1e-2, min_lr=1e-3, targets=TargetSettings(num_views=3, num_candidates=8),
        accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False, enable_model_summary=False,
    )
    rank = os.environ.get("LOCAL_RANK", "0")
    save_file({"reg_token": model.reg_token.detach().contiguous()}, f"{out}/rank{rank}.safetensors")
""")


def test_ddp_ranks_agree_and_export_once(tmp_path):
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, cwd=tmp_path, timeout=300)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors"))["reg_token"] for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    exported = load(tmp_path / "export")
    assert torch.equal(exported.reg_token.detach(), ranks[0])
    torch.manual_seed(0)
    teacher = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8)
    assert not torch.allclose(add_registers(teacher, 4, seed=0).reg_token, ranks[0])  # it trained
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left
