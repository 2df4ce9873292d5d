"""The device mesh: topology-aware order (the same devices, in the same order, as a plain reshape
on CPU), sub-meshes, the multi-slice layout and its one-line refusals."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jmerge import sharding as shd
from jmerge.errors import JmergeError


def test_mesh_orders_devices_as_before_and_takes_sub_meshes():
    for spec in (None, "fsdp=4,tensor=2", "data=2,fsdp=-1", "tensor=8"):
        mesh = shd.make_mesh(spec)
        assert mesh.axis_names == shd.AXES
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
        sizes = shd.parse_mesh_spec(spec)
        want = np.asarray(jax.devices()).reshape([sizes[a] for a in shd.AXES])
        assert (mesh.devices == want).all(), spec
    # A sub-mesh: a spec sized to the devices given, or axis sizes taking the first devices.
    sub = shd.make_mesh("fsdp=2,tensor=2", devices=jax.devices()[4:])
    assert [d.id for d in sub.devices.flat] == [d.id for d in jax.devices()[4:]]
    assert shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}).devices.size == 2
    with pytest.raises(JmergeError, match=r"^--mesh 'fsdp=8' needs 8 devices; 4 are present$"):
        shd.make_mesh("fsdp=8", devices=jax.devices()[:4])
    with pytest.raises(JmergeError, match="needs more than the 4 given"):
        shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices=jax.devices()[:4])


def fake_devices(slices: list[int], platform: str = "cpu"):
    return [SimpleNamespace(id=i, slice_index=s, process_index=i // 2, platform=platform, device_kind=platform)
            for i, s in enumerate(slices)]


def test_multi_slice_puts_data_outermost_over_slices():
    devs = fake_devices([1, 1, 1, 1, 0, 0, 0, 0])  # listed out of slice order
    grid = shd.slice_grid((2, 2, 2), devs)
    assert grid.shape == (2, 2, 2)
    assert [d.slice_index for d in grid[0].flat] == [0] * 4 and [d.slice_index for d in grid[1].flat] == [1] * 4
    # Two data rows per slice: each slice holds a whole (data/2, fsdp, tensor) block.
    grid = shd.slice_grid((4, 2, 1), devs)
    assert [[d.slice_index for d in row.flat] for row in grid] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert shd.split_over_slices((4, 2, 1), 2) == ((2, 2, 1), (2, 1, 1))
    # TPU slices without a spec: fsdp within each slice, data over the slices; one slice: fsdp
    # over all. GPU hosts (which jax also gives slice indices) are one slice: fsdp may span them.
    tpus = fake_devices([1, 1, 1, 1, 0, 0, 0, 0], "tpu")
    assert shd.mesh_sizes(None, tpus) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert shd.mesh_sizes(None, tpus[:4]) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert shd.mesh_sizes("data=2,tensor=2,fsdp=-1", tpus) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert shd.mesh_sizes(None, fake_devices([0, 0, 0, 0, 1, 1, 1, 1], "gpu")) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(JmergeError, match=r"span 2 slices: the mesh's data axis \(1\) must be a multiple of 2"):
        shd.slice_grid((1, 4, 2), devs)
    with pytest.raises(JmergeError, match="spread unevenly over slices"):
        shd.slice_grid((2, 3, 1), fake_devices([0, 0, 0, 0, 1, 1]))
