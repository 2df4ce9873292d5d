"""A search checkpoint resumes on another process/device layout of the same mesh shape
(fsdp=4,tensor=2): written by 2 processes x 4 devices and resumed by 1 process x 8, and the
reverse. The run's fingerprint leaves the layout out, and the state is restored onto the new
run's shardings. The resumed run ends within float32 rounding of an uninterrupted one (RTOL: the
all-reduces of the steps after the resume run over gloo in one layout and in-process in the
other, which may sum in another order). On the same layout a resume is bit-identical
(tests/test_search.py)."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mp_restore_worker import crashed_copy, search
from test_multiprocess import run_two, script

RTOL = 1e-6  # relative, on λ and on the losses of the resumed steps (float32 eps is 1.2e-7)


def close(got: dict, want: dict, what: str) -> None:
    for k in ("layers", "rest"):
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=0, err_msg=f"{what}: {k}")
    np.testing.assert_allclose(got["loss"], want["loss"][2:], rtol=RTOL, atol=0, err_msg=f"{what}: loss")


def test_search_checkpoint_resumes_across_process_layouts(tiny_model_dir, tmp_path):
    dirs = [str(tiny_model_dir("llama", s)) for s in (0, 1, 2)]

    def pair(name: str, ckpt) -> dict:
        out = tmp_path / f"{name}.npz"
        run_two(lambda port, i: script("mp_restore_worker.py") + [str(port), str(i), str(out), str(ckpt), *dirs],
                tmp_path, name)
        return dict(np.load(out))

    # Uninterrupted on 2 x 4 (its checkpoints are what matters) while the same runs on 1 x 8 here.
    with ThreadPoolExecutor(1) as pool:
        two = pool.submit(pair, "two", tmp_path / "two")
        one = search(dirs, str(tmp_path / "one"))
        two.result()  # its failure, with the pair's logs
    assert len(one["loss"]) == 4
    meta = [json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "two")]
    assert meta[0] == meta[1] == {"fingerprint": meta[0]["fingerprint"], "step": 4}

    close(search(dirs, str(crashed_copy(tmp_path / "two", tmp_path / "two-to-one"))), one, "2x4 -> 1x8")
    close(pair("one-to-two", crashed_copy(tmp_path / "one", tmp_path / "one-to-two")), one, "1x8 -> 2x4")
