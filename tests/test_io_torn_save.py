"""A save interrupted between its two renames leaves new weights beside the old config: loading
must then give the adapter the weights belong to, never new weights read with the old config."""
import os

import pytest
import torch

import fastadapters as fa
from fastadapters import io as faio
from tiny_models import input_ids, tiny_model


def _lora(alpha):
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", r=4, alpha=alpha)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model.eval()


def test_torn_save_loads_the_weights_own_config(tmp_path, monkeypatch):
    ids = input_ids()
    old, new = _lora(8), _lora(2)
    fa.save_adapter(old, tmp_path)
    real_replace, calls = os.replace, []

    def crash_on_config(src, dst):
        calls.append(dst)
        if dst.endswith(faio.CONFIG_NAME):
            raise OSError("simulated crash between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(faio.os, "replace", crash_on_config)
    with pytest.raises(OSError):
        fa.save_adapter(new, tmp_path)
    monkeypatch.setattr(faio.os, "replace", real_replace)
    assert calls[0].endswith(faio.WEIGHTS_NAME)  # weights went in first, the config did not
    assert faio._read_json(os.path.join(tmp_path, faio.CONFIG_NAME))["alpha"] == 8

    fresh = tiny_model("llama").eval()
    with pytest.warns(RuntimeWarning, match="interrupted"):
        fa.load_adapter(fresh, tmp_path)
    assert fa.get_config(fresh).alpha == 2
    torch.testing.assert_close(fresh(ids).logits, new(ids).logits, rtol=0, atol=0)


def test_intact_save_loads_without_warning(tmp_path, recwarn):
    model = _lora(8)
    fa.save_adapter(model, tmp_path)
    fresh = tiny_model("llama").eval()
    fa.load_adapter(fresh, tmp_path)
    assert not [w for w in recwarn if "interrupted" in str(w.message)]


def test_hand_edited_config_is_respected(tmp_path):
    import json

    model = _lora(8)
    fa.save_adapter(model, tmp_path)
    cfg_file = os.path.join(tmp_path, faio.CONFIG_NAME)
    d = json.loads(open(cfg_file).read())
    d["alpha"] = 4  # a user's deliberate edit keeps the save_id
    open(cfg_file, "w").write(json.dumps(d))
    fresh = tiny_model("llama").eval()
    fa.load_adapter(fresh, tmp_path)
    assert fa.get_config(fresh).alpha == 4
