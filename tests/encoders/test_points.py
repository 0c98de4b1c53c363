"""Point-cloud encoder: sampling/grouping correctness, invariances, file loading and its errors, forward + backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unimoe.connectors import build_connector
from unimoe.encoders import ENCODERS, MediaError, build_encoder
from unimoe.encoders.points import (
    PointCloudEncoder,
    PointCloudEncoderConfig,
    canonical_pose,
    farthest_point_sample,
    farthest_point_sample_single,
    group_points,
    knn_indices,
    load_points,
    resample_points,
)
from unimoe.errors import ConfigError

TINY = {"num_points": 128, "num_groups": 16, "group_size": 8, "dim": 32, "depth": 2, "num_heads": 4}


def tiny_config(**overrides) -> PointCloudEncoderConfig:
    return PointCloudEncoderConfig(**{**TINY, **overrides})


def tiny_encoder(seed: int = 0, **overrides) -> PointCloudEncoder:
    torch.manual_seed(seed)
    return PointCloudEncoder(tiny_config(**overrides)).eval()


def random_cloud(n: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 128, channels, generator=torch.Generator().manual_seed(seed))


# -- sampling and grouping ---------------------------------------------------------------------------------------------


def test_fps_on_a_line_picks_the_ends_first():
    coords = torch.tensor([3.0, 0.0, 10.0, 1.0, 2.0, 6.0])
    xyz = torch.stack([coords, torch.zeros(6), torch.zeros(6)], dim=-1)[None]  # (1, 6, 3)
    picked = coords[farthest_point_sample(xyz, 3)[0]].tolist()
    # centroid 3.67: 10 is farthest -> start; 0 is farthest from {10}; then 6 (distance 4 to the set {0, 10})
    assert picked == [10.0, 0.0, 6.0]


def test_fps_on_a_grid_picks_the_four_corners():
    g = torch.linspace(-1, 1, 11)
    xy = torch.cartesian_prod(g, g)  # (121, 2)
    xyz = torch.cat([xy, torch.zeros(121, 1)], dim=-1)[None]
    picked = xyz[0, farthest_point_sample(xyz, 4)[0], :2]
    assert sorted(map(tuple, picked.abs().tolist())) == [(1.0, 1.0)] * 4
    assert len({tuple(p) for p in picked.tolist()}) == 4


def test_fps_is_batched_and_picks_distinct_points():
    xyz = random_cloud(3)
    index = farthest_point_sample(xyz, 32)
    assert index.shape == (3, 32)
    for row, single in zip(index, xyz):
        assert len(set(row.tolist())) == 32
        assert torch.equal(row, farthest_point_sample(single[None], 32)[0])  # no cross-talk between clouds


@pytest.mark.parametrize("points,k", [(128, 32), (1024, 512), (300, 300)])
def test_fps_of_one_cloud_in_numpy_picks_what_the_torch_one_does(points, k):
    # preprocessing uses the numpy version (one cloud at a time); the model's grouping uses the batched torch one
    gen = torch.Generator().manual_seed(points)
    xyz = torch.randn(4, points, 3, generator=gen) * torch.tensor([3.0, 1.0, 0.2])  # anisotropic, like the shapes
    for cloud in xyz:
        expected = farthest_point_sample(cloud[None], k)[0].numpy()
        np.testing.assert_array_equal(farthest_point_sample_single(cloud.numpy(), k), expected)
    with pytest.raises(ValueError, match="cannot pick"):
        farthest_point_sample_single(xyz[0].numpy(), points + 1)


def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    points, queries = torch.randn(2, 200, 3, generator=gen), torch.randn(2, 10, 3, generator=gen)
    index = knn_indices(queries, points, 7)  # (2, 10, 7)
    for b in range(2):
        for q in range(10):
            dist = ((points[b] - queries[b, q]) ** 2).sum(-1).numpy().astype(np.float64)
            expected = np.argsort(dist, kind="stable")[:7]
            assert set(index[b, q].tolist()) == set(expected.tolist())
            assert np.all(np.diff(dist[index[b, q].numpy()]) >= 0)  # nearest first


def test_groups_are_relative_to_their_center_and_contain_it():
    values = torch.cat([random_cloud(2), torch.rand(2, 128, 3)], dim=-1)  # xyz + rgb
    groups, centers = group_points(values, 16, 8)
    assert groups.shape == (2, 16, 8, 6) and centers.shape == (2, 16, 3)
    assert torch.allclose(groups[:, :, 0, :3], torch.zeros(2, 16, 3))  # the nearest neighbour is the center itself
    # extra channels are carried unchanged: each group's rgb rows exist in the cloud
    rgb = values[0, :, 3:]
    assert all((rgb == row).all(-1).any() for row in groups[0].reshape(-1, 6)[:, 3:])


# -- network -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [3, 6, 9])
def test_forward_backward(in_channels):
    encoder = tiny_encoder(in_channels=in_channels).train()
    values = random_cloud(2, in_channels).requires_grad_(True)
    tokens = encoder(values)
    assert tokens.shape == (2, PointCloudEncoder.tokens_per_unit(encoder.config), encoder.output_dim) == (2, 16, 32)
    tokens.square().mean().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_output_is_invariant_to_the_order_of_the_points():
    encoder = tiny_encoder()
    values = random_cloud(2)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(encoder(values), encoder(values[:, perm]), atol=1e-5)


def test_batch_does_not_change_a_clouds_tokens():
    encoder = tiny_encoder()
    values = random_cloud(3)
    with torch.no_grad():
        assert torch.allclose(encoder(values)[1:2], encoder(values[1:2]), atol=1e-5)


def test_preprocess_normalizes_and_makes_tokens_translation_and_scale_invariant():
    config = tiny_config()
    cloud = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    values = PointCloudEncoder.preprocess(cloud, config)["values"]
    assert values.shape == (1, 128, 3)
    assert torch.allclose(values[0].mean(0), torch.zeros(3), atol=1e-5)
    assert values[0].norm(dim=-1).max() == pytest.approx(1.0, abs=1e-5)
    moved = PointCloudEncoder.preprocess(cloud * 7.5 + np.array([3.0, -2.0, 10.0], np.float32), config)["values"]
    assert torch.allclose(values, moved, atol=1e-5)
    encoder = tiny_encoder()
    with torch.no_grad():
        assert torch.allclose(encoder(values), encoder(moved), atol=1e-4)


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


def _skewed_cloud(n: int = 128) -> torch.Tensor:
    """Distinct variances and a non-zero third moment along every axis: a cloud whose PCA pose is unique."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.exponential(size=(n, 3)) * np.array([3.0, 1.5, 0.5]) + np.array([1.0, -2.0, 0.5]))


def test_canonical_pose_is_a_rotation_that_undoes_any_rotation():
    cloud = _skewed_cloud()
    posed = canonical_pose(cloud)

    def distances(x):
        return (x[:, None] - x[None]).norm(dim=-1)

    assert torch.allclose(distances(posed), distances(cloud), atol=1e-9)  # a rigid motion
    assert torch.allclose(posed.mean(0), cloud.mean(0), atol=1e-9)  # about the centroid
    spread = (posed - posed.mean(0)).var(0)
    assert spread[0] > spread[1] > spread[2]  # x along the largest variance
    normals = torch.nn.functional.normalize(torch.randn(128, 3, dtype=torch.float64), dim=-1)
    with_normals = torch.cat([cloud, normals], dim=1)
    for seed in range(5):
        rotation = _rotation(seed)
        moved = canonical_pose(cloud @ rotation.T)
        assert torch.allclose(moved - moved.mean(0), posed - posed.mean(0), atol=1e-8)
        turned = torch.cat([cloud @ rotation.T, normals @ rotation.T], dim=1)
        # normals turn with the points (colours would stay: only the last three channels of *normal features turn)
        expected = canonical_pose(with_normals, "xyznormal")[:, 3:]
        assert torch.allclose(canonical_pose(turned, "xyznormal")[:, 3:], expected, atol=1e-8)


def test_pca_pose_makes_the_tokens_rotation_invariant():
    config = tiny_config(pose="pca")
    cloud = _skewed_cloud().float().numpy()
    rotated = (cloud @ _rotation(3).float().numpy().T).astype(np.float32)
    values = PointCloudEncoder.preprocess(cloud, config)["values"]
    assert torch.allclose(values, PointCloudEncoder.preprocess(rotated, config)["values"], atol=1e-5)
    plain = tiny_config()
    assert not torch.allclose(
        PointCloudEncoder.preprocess(cloud, plain)["values"],
        PointCloudEncoder.preprocess(rotated, plain)["values"],
        atol=1e-2,
    )


@pytest.mark.parametrize("count", [40, 128, 1000, 5000])
def test_resampling_is_deterministic_order_free_and_exact(count):
    points = torch.from_numpy(np.random.default_rng(count).normal(size=(count, 3)).astype(np.float32))
    out = resample_points(points, 128)
    assert out.shape == (128, 3)
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    shuffled = resample_points(points[perm], 128)
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, shuffled.tolist()))
    source = {tuple(p) for p in points.tolist()}
    assert all(tuple(p) in source for p in out.tolist())
    if count >= 128:
        assert len({tuple(p) for p in out.tolist()}) == 128  # no duplicates when downsampling
    else:
        assert {tuple(p) for p in out.tolist()} == source  # every point kept when upsampling


def test_tokens_feed_the_mlp_connector():
    encoder = tiny_encoder()
    connector = build_connector("points", {"type": "mlp"}, input_dim=encoder.output_dim, output_dim=64)
    out = connector(encoder(random_cloud(2)))
    assert out.shape == (2, 16, 64)


def test_registry_build_and_load_pretrained(tmp_path):
    from safetensors.torch import save_file

    assert ENCODERS.get("point_bert") is PointCloudEncoder
    source = build_encoder("points", {"type": "point_bert", **TINY}).eval()
    save_file(source.state_dict(), str(tmp_path / "points.safetensors"))
    torch.manual_seed(123)
    loaded = build_encoder("points", {"type": "point_bert", "pretrained": str(tmp_path / "points.safetensors"), **TINY})
    values = random_cloud(1)
    with torch.no_grad():
        assert torch.equal(source(values), loaded.eval()(values))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_groups": 200}, "encoders.points.num_groups"),
        ({"group_size": 500}, "encoders.points.group_size"),
        ({"in_channels": 4}, "encoders.points.in_channels"),
        ({"num_heads": 5}, "encoders.points.num_heads"),
        ({"dim": 0}, "encoders.points.dim"),
        ({"in_channels": 6, "features": "xyzrgbnormal"}, "encoders.points.features"),
        ({"features": "depth"}, "encoders.points.features"),
        ({"pose": "icp"}, "encoders.points.pose"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**overrides)


def test_unknown_spec_field_is_named():
    with pytest.raises(ConfigError, match="bogus"):
        build_encoder("points", {"type": "point_bert", "bogus": 1})


# -- files -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ply", ".obj", ".off", ".stl"])
def test_mesh_files_are_sampled_on_the_surface(tmp_path, suffix):
    import trimesh

    path = tmp_path / f"box{suffix}"
    trimesh.creation.box(extents=(1.0, 1.0, 1.0)).export(path)
    config = tiny_config()
    points = PointCloudEncoder.load(path, config)
    assert points.shape == (128, 3) and points.dtype == np.float32
    np.testing.assert_allclose(np.abs(points).max(axis=1), 0.5, atol=1e-5)  # every point lies on a face
    np.testing.assert_array_equal(points, PointCloudEncoder.load(path, config))  # fixed seed
    values = PointCloudEncoder.preprocess(points, config)["values"]
    assert tiny_encoder()(values).shape == (1, 16, 32)


def test_colored_point_cloud_ply_gives_rgb_channels(tmp_path):
    import trimesh

    rng = np.random.default_rng(0)
    colors = np.concatenate([rng.integers(0, 256, (60, 3)), np.full((60, 1), 255)], axis=1).astype(np.uint8)
    trimesh.PointCloud(rng.normal(size=(60, 3)), colors=colors).export(tmp_path / "cloud.ply")
    points = load_points(tmp_path / "cloud.ply", tiny_config(in_channels=6))
    assert points.shape == (60, 6)
    np.testing.assert_allclose(points[:, 3:], colors[:, :3] / 255.0, atol=1e-6)
    assert load_points(tmp_path / "cloud.ply", tiny_config()).shape == (60, 3)


def test_npy_and_text_files(tmp_path):
    cloud = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "cloud.npy", cloud)
    np.savetxt(tmp_path / "cloud.xyz", cloud[:, :3])
    np.savetxt(tmp_path / "cloud.txt", cloud, delimiter=",")  # ModelNet-style comma-separated xyz + normals
    np.testing.assert_allclose(load_points(tmp_path / "cloud.npy", tiny_config()), cloud[:, :3])
    np.testing.assert_allclose(load_points(tmp_path / "cloud.xyz", tiny_config()), cloud[:, :3], atol=1e-6)
    config6 = tiny_config(in_channels=6, features="xyznormal")
    np.testing.assert_allclose(load_points(tmp_path / "cloud.txt", config6), cloud, atol=1e-6)
    np.testing.assert_allclose(load_points(torch.from_numpy(cloud), config6), cloud)


EMPTY_PLY = (
    "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.ply", EMPTY_PLY, "zero points"),
        ("corrupt.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 9\n\x00\x13\xff", "not a readable ply"),
        ("random.ply", bytes(range(256)) * 3, "not a readable ply"),
        ("zero.npy", np.zeros((0, 3), np.float32), "zero points"),
        ("nan.npy", np.array([[0, 0, 0], [np.nan, 1, 2]], np.float32), "NaN"),
        ("flat.npy", np.zeros((10, 2), np.float32), "2 channels"),
        ("text.xyz", "1 2 3\n4 five 6\n", "table of numbers"),
        ("nothing.npy", b"", "empty"),
        ("random.npy", bytes(range(256)) * 3, r"no NumPy array header; pickled or other data is never loaded\)$"),
        ("objects.npy", np.array([[1, 2, 3], [4, 5]], dtype=object), "Python objects"),
        ("cloud.las", "1 2 3\n", "unsupported"),
    ],
)
def test_bad_files_raise_media_error_naming_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(MediaError, match=problem) as info:
        PointCloudEncoder.load(path, tiny_config())
    assert str(path) in str(info.value)


def test_missing_file_big_file_and_bad_arrays(tmp_path):
    config = tiny_config()
    with pytest.raises(MediaError, match="does not exist") as info:
        PointCloudEncoder.load(tmp_path / "missing.ply", config)
    assert "missing.ply" in str(info.value)
    np.save(tmp_path / "big.npy", np.zeros((1000, 3), np.float32))
    with pytest.raises(MediaError, match="above the limit") as info:
        PointCloudEncoder.load(tmp_path / "big.npy", config, max_bytes=1000)
    assert "big.npy" in str(info.value)
    with pytest.raises(MediaError, match="NaN"):
        PointCloudEncoder.load(np.full((10, 3), np.nan), config)
    with pytest.raises(MediaError, match="infinite"):
        PointCloudEncoder.load(torch.tensor([[0.0, 0.0, float("inf")]]), config)
    with pytest.raises(MediaError, match="3 channels"):
        PointCloudEncoder.load(np.zeros((10, 3)), tiny_config(in_channels=6))


def test_a_ply_with_fewer_vertices_than_its_header_declares_is_rejected(tmp_path):
    header = "ply\nformat ascii 1.0\nelement vertex 100\nproperty float x\nproperty float y\nproperty float z\n"
    path = tmp_path / "cut.ply"
    path.write_text(header + "end_header\n0 0 0\n")
    with pytest.raises(
        MediaError, match=r"cut.ply: the PLY header declares 100 'vertex' elements but the file holds 1"
    ):
        load_points(path, tiny_config())
    path.write_text(header.replace("100", "2") + "end_header\n0 0 0\n1 1 1\n")
    assert load_points(path, tiny_config()).shape == (2, 3)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ([[0, 0, 0], [1, 1]], r"<list>: expected an \(N, C\) point array; the rows have different lengths"),
        ({"x": [0]}, "<dict>: a point cloud must be a file path, bytes or an"),
        (7, "<int>: a point cloud must be"),
        (np.array([[1e300, 0.0, 0.0]]), "values too large for float32"),
    ],
)
def test_unusable_point_objects_name_what_is_accepted(source, needle):
    with pytest.raises(MediaError, match=needle):
        load_points(source, tiny_config())
