import math

import pytest
import torch

from fastddpm.model import UNet, Up, time_encoding


def test_paper_parameter_count():
    assert sum(p.numel() for p in UNet().parameters()) == 12_920_323


def test_block_shapes_follow_section_3_2():
    model = UNet()
    shapes = {}
    for name in ["inc", "down1", "down2", "sa1", "down3", "sa2", "up1", "sa3", "up2", "up3", "outc"]:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32)
    assert shapes == {
        "inc": (2, 64, 32, 32), "down1": (2, 128, 16, 16), "down2": (2, 256, 8, 8), "sa1": (2, 256, 8, 8),
        "down3": (2, 256, 4, 4), "sa2": (2, 256, 4, 4), "up1": (2, 128, 8, 8), "sa3": (2, 128, 8, 8),
        "up2": (2, 64, 16, 16), "up3": (2, 64, 32, 32), "outc": (2, 3, 32, 32),
    }


def test_up_blocks_take_the_paper_widths():
    model = UNet()
    assert model.up1.conv_res.conv1.in_channels == 512 and model.up1.conv_out.conv2.out_channels == 128
    assert model.up1.conv_out.conv1.out_channels == 256  # middle width in/2
    assert model.up3.conv_res.conv1.in_channels == 128 and model.outc.kernel_size == (1, 1)


@pytest.mark.parametrize("channels", [6, 64, 128])
def test_time_encoding_is_eq_11_with_negative_exponent(channels):
    t = torch.tensor([0, 1, 17, 999])
    enc = time_encoding(t, channels)
    for i, step in enumerate(t.tolist()):
        for c in range(channels):
            angle = step * 10000 ** (-(2 * (c // 2)) / channels)
            expected = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            assert enc[i, c].item() == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("block", ["down1", "down3", "up1", "up3"])
def test_time_encoding_is_added_at_the_end_of_each_down_and_up_block(block):
    torch.manual_seed(0)
    model = UNet(base_channels=8).eval()
    module = getattr(model, block)
    if block.startswith("down"):
        c_in = module.conv_res.conv1.in_channels
        args = (torch.randn(1, c_in, 16, 16),)
    else:
        c_in = module.conv_res.conv1.in_channels // 2
        args = (torch.randn(1, c_in, 8, 8), torch.randn(1, c_in, 16, 16))
    ta, tb = torch.tensor([3]), torch.tensor([250])
    with torch.no_grad():
        diff = module(*args, ta) - module(*args, tb)  # same input: only the added encoding differs
    channels = diff.shape[1]
    expected = (time_encoding(ta, channels) - time_encoding(tb, channels))[:, :, None, None].expand_as(diff)
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)


def test_kernel_switch_reaches_every_norm():
    model = UNet(base_channels=8)
    assert model.kernels == "auto"
    model.set_kernels("torch")
    assert all(m.kernels == "torch" for m in model.modules() if hasattr(m, "gelu"))
    ups = [m for m in model.modules() if isinstance(m, Up)]  # the upsampling's backward follows the switch
    assert len(ups) == 3 and all(m.kernels == "torch" for m in ups)
    model.set_kernels("triton")
    assert all(m.kernels == "triton" for m in model.modules() if hasattr(m, "gelu") or isinstance(m, Up))


def test_triton_kernels_where_they_cannot_run_are_one_clear_error(monkeypatch):
    """On a CPU without Triton's interpreter the forward refuses in one line (a UsageError naming the
    device and the ways out), instead of failing inside Triton's launcher."""
    from fastddpm.errors import UsageError

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what a user's CPU machine has: the interpreter off
    model = UNet(base_channels=8, kernels="triton")
    with pytest.raises(UsageError, match=r"kernels='triton' on cpu: .*or use the torch kernels"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
