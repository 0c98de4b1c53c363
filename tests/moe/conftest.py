import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with 2 threads, one busy core elsewhere stalls every parallel op for a scheduler
    tick (a 10 ms test takes seconds), so the MoE tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_loop_reference(x, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, weight, keep, token_index, counts, s):
    """The LoRA-expert layer (``_LoRAExpertLoop``'s arguments) one routed slot at a time, through autograd."""
    t, (e, i, r) = x.shape[0], b_g.shape
    g0, u0 = F.linear(x, w_gu).chunk(2, dim=-1)
    mixed = torch.zeros(t, i, dtype=x.dtype) if keep is None else F.silu(g0) * u0 * keep[:, None]
    delta = torch.zeros_like(x)
    experts = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
    for slot, (tok, ex) in enumerate(zip(token_index.tolist(), experts.tolist())):
        a = s * a_gu[ex] @ x[tok]
        hid = F.silu(g0[tok] + b_g[ex] @ a[:r]) * (u0[tok] + b_u[ex] @ a[r:])
        mixed = mixed.index_add(0, torch.tensor([tok]), (weight[slot] * hid)[None])
        delta = delta.index_add(0, torch.tensor([tok]), (s * weight[slot] * b_d[ex] @ (a_d[ex] @ hid))[None])
    return mixed @ w_d.T + delta


@pytest.fixture
def lora_loop_reference():
    return _lora_loop_reference
