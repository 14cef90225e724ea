"""CIRKD (spec section 7): mini-batch p2p, memory p2p / p2r, queues, replay, state, a real run."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

import harness.engine.train
from harness.methods import Batch, MethodContext, Progress
from harness.methods.cirkd import CIRKD, batch_p2p, memory_kl, nearest_labels
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)
IGNORE = 255
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


# ------------------------------------------------------------------------------ loop references
def normed(vec):
    n = max(math.sqrt(sum(x * x for x in vec)), 1e-12)
    return [x / n for x in vec]


def kl_of_logits(t_logits, s_logits):
    """KL(softmax(t) || softmax(s)) for two plain lists."""
    mt, ms = max(t_logits), max(s_logits)
    zt = mt + math.log(sum(math.exp(x - mt) for x in t_logits))
    zs = ms + math.log(sum(math.exp(x - ms) for x in s_logits))
    return sum(math.exp(t - zt) * ((t - zt) - (s - zs)) for t, s in zip(t_logits, s_logits))


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def pixels(feat, i):
    """Normalised pixel vectors of image i of a B x C x h x w tensor, raster order."""
    f = feat[i].double()
    c, h, w = f.shape
    return [normed([float(f[ch, y, x]) for ch in range(c)]) for y in range(h) for x in range(w)]


def ref_pair(s, t, i, j, tau):
    """1/A sum_a KL(softmax(S^t_ij[a]/tau) || softmax(S^s_ij[a]/tau)), spec 7.1."""
    si, sj, ti, tj = pixels(s, i), pixels(s, j), pixels(t, i), pixels(t, j)
    total = 0.0
    for a in range(len(si)):
        total += kl_of_logits([dot(ti[a], v) / tau for v in tj], [dot(si[a], v) / tau for v in sj])
    return total / len(si)


def ref_batch_p2p(s, t, tau):
    b = s.shape[0]
    return sum(ref_pair(s, t, i, j, tau) for i in range(b) for j in range(b)) / b ** 2


def ref_memory(s_rows, t_rows, contrast, tau_c, tau_kd):
    """tau_kd^2 / n sum_a KL(softmax(t_a V^T / tau_c / tau_kd) || same for s_a), spec 7.5."""
    v = contrast.double().tolist()
    total = 0.0
    for s_a, t_a in zip(s_rows.double().tolist(), t_rows.double().tolist()):
        total += kl_of_logits([dot(t_a, r) / tau_c / tau_kd for r in v], [dot(s_a, r) / tau_c / tau_kd for r in v])
    return tau_kd ** 2 * total / len(s_rows)


def ref_projection(x, head):
    """Conv1x1 - BatchNorm (training: biased batch statistics over B*h*w) - ReLU - Conv1x1, by loops."""
    w1 = head[0].weight.detach().double()[:, :, 0, 0].tolist()
    bn = head[1]
    w2 = head[3].weight.detach().double()[:, :, 0, 0].tolist()
    b, _, h, w = x.shape
    xs = x.detach().double()
    vecs = [[[float(xs[n, c, y, z]) for c in range(xs.shape[1])] for y in range(h) for z in range(w)] for n in range(b)]
    y1 = [[[dot(row, v) for row in w1] for v in img] for img in vecs]
    flat = [v for img in y1 for v in img]
    c_t = len(w1)
    mean = [sum(v[c] for v in flat) / len(flat) for c in range(c_t)]
    var = [sum((v[c] - mean[c]) ** 2 for v in flat) / len(flat) for c in range(c_t)]
    gamma, beta = bn.weight.detach().double().tolist(), bn.bias.detach().double().tolist()
    y2 = [[[max(0.0, (v[c] - mean[c]) / math.sqrt(var[c] + bn.eps) * gamma[c] + beta[c]) for c in range(c_t)]
           for v in img] for img in y1]
    y3 = [[[dot(row, v) for row in w2] for v in img] for img in y2]
    out = torch.tensor(y3, dtype=torch.float64)  # B x A x C_t
    return out.permute(0, 2, 1).reshape(b, c_t, h, w)


def ref_enqueue(pixel_q, pixel_ptr, region_q, region_ptr, t_norm, labels, gen, freq, compat=False):
    """Spec 7.4 by loops on copies; returns the new (pixel_q, pixel_ptr, region_q, region_ptr).
    `gen` replays the method's draws: one randperm(n_k) per (image, class), classes ascending."""
    pixel_q, region_q = pixel_q.clone().double(), region_q.clone().double()
    pixel_ptr, region_ptr = list(pixel_ptr), list(region_ptr)
    n_p, n_r = pixel_q.shape[1], region_q.shape[1]
    b, c, h, w = t_norm.shape
    for i in range(b):
        lab = [int(labels[i, y, x]) for y in range(h) for x in range(w)]
        vecs = [[float(t_norm[i, ch, y, x]) for ch in range(c)] for y in range(h) for x in range(w)]
        for k in sorted(set(lab) - {IGNORE}):
            own = [p for p, l in enumerate(lab) if l == k]
            mean = [sum(vecs[p][ch] for p in own) / len(own) for ch in range(c)]
            region_q[k, region_ptr[k]] = torch.tensor(normed(mean), dtype=torch.float64)
            region_ptr[k] = (region_ptr[k] + 1) % n_r
            perm = torch.randperm(len(own), generator=gen).tolist()
            kk = min(len(own), freq)
            chosen = perm[:kk] if compat else [own[p] for p in perm[:kk]]
            rows = torch.tensor([normed(vecs[p]) for p in chosen], dtype=torch.float64)
            if pixel_ptr[k] + kk >= n_p:
                pixel_q[k, n_p - kk:] = rows
                pixel_ptr[k] = 0
            else:
                pixel_q[k, pixel_ptr[k]:pixel_ptr[k] + kk] = rows
                pixel_ptr[k] += kk
    return pixel_q, pixel_ptr, region_q, region_ptr


# ------------------------------------------------------------------------------------- helpers
SMALL = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 8,
         "region_contrast_size": 4, "pixel_update_freq": 3}


def context(c_s=3, c_t=5, k=4, seed=0):
    return MethodContext(num_classes=k, ignore_index=IGNORE, student_channels={"head": c_s, "stage4": 7},
                         student_strides={"head": 8}, teacher_channels={"head": c_t, "stage4": 9},
                         teacher_strides={"head": 8}, generator=torch.Generator().manual_seed(seed))


def method(ctx=None, **cfg):
    return CIRKD({**SMALL, **cfg}, ctx or context()).double()


def randn(*shape, seed=0, grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.requires_grad_(grad)


def crafted_mask(b=2, h=6, w=10):
    """Labels at 2x a 3 x 5 feature map (nearest keeps label rows 0, 2, 4 and columns 0, 2, .., 8): row 0
    ignore; image 0: class 0 left, class 1 right, class 2 at a single feature pixel; image 1: class 3
    covers the left columns (so no class 0), class 1 right."""
    mask = torch.zeros(b, h, w, dtype=torch.long)
    mask[:, :, 4:] = 1
    mask[:, 0, :] = IGNORE
    mask[0, 4, 8] = 2          # feature pixel (2, 4): nearest picks label pixel (4, 8)
    mask[1, 2:, :3] = 3
    return mask


def outputs(mask, c_s=3, c_t=5, grid=(3, 5), seed=1):
    b = mask.shape[0]
    s = randn(b, c_s, *grid, seed=seed, grad=True)
    t = randn(b, c_t, *grid, seed=seed + 100)
    return SegOutput(None, None, {"head": s}), SegOutput(None, None, {"head": t}), Batch(None, mask)


# ------------------------------------------------------------------------------- mini-batch p2p
@pytest.mark.parametrize("b", [1, 2, 3])
@pytest.mark.parametrize("tau", [0.1, 0.7])
@pytest.mark.parametrize("chunk", [2 ** 24, 7])
def test_batch_p2p_matches_the_loop_reference(b, tau, chunk):
    s, t = randn(b, 3, 3, 5, seed=b), randn(b, 6, 3, 5, seed=b + 10)  # C_s != C_t, odd h x w
    got = float(batch_p2p(s, t, tau, 1, chunk_elements=chunk))
    assert got == pytest.approx(ref_batch_p2p(s, t, tau), rel=1e-9)


def test_batch_p2p_self_pairs_and_the_one_over_b_squared():
    s, t = randn(1, 4, 3, 3, seed=0), randn(1, 5, 3, 3, seed=1)
    one = float(batch_p2p(s, t, 0.1, 1))
    assert one == pytest.approx(ref_pair(s, t, 0, 0, 0.1), rel=1e-9)  # B = 1: only the self-pair
    # a batch of two copies: four pairs all equal to the self-pair, averaged by 1/B^2
    assert float(batch_p2p(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), 0.1, 1)) == pytest.approx(one, rel=1e-9)
    s2, t2 = randn(2, 4, 3, 3, seed=2), randn(2, 5, 3, 3, seed=3)
    pairs = [ref_pair(s2, t2, i, j, 0.1) for i in range(2) for j in range(2)]
    assert float(batch_p2p(s2, t2, 0.1, 1)) == pytest.approx(sum(pairs) / 4, rel=1e-9)
    assert pairs[1] != pytest.approx(pairs[2])  # (0, 1) and (1, 0) are different terms: ordered pairs


def test_batch_p2p_properties():
    s = randn(2, 4, 3, 5, seed=0)
    assert float(batch_p2p(s, s.clone(), 0.1, 1)) == pytest.approx(0.0, abs=1e-12)
    t = randn(2, 6, 3, 5, seed=1)
    base = float(batch_p2p(s, t, 0.1, 1))
    assert base > 0
    scale = randn(2, 1, 3, 5, seed=2).abs() + 0.1  # per-pixel positive scale: normalised away
    assert float(batch_p2p(s * scale, t, 0.1, 1)) == pytest.approx(base, rel=1e-9)
    pi = torch.tensor([1, 0])  # image order does not matter (all ordered pairs are averaged)
    assert float(batch_p2p(s[pi], t[pi], 0.1, 1)) == pytest.approx(base, rel=1e-9)


def test_batch_p2p_pooling_is_the_term_on_pooled_features():
    s, t = randn(2, 3, 5, 7, seed=0), randn(2, 4, 5, 7, seed=1)
    pooled = float(batch_p2p(s, t, 0.1, pool=2))
    want = ref_batch_p2p(F.avg_pool2d(s, 2, 2, ceil_mode=True), F.avg_pool2d(t, 2, 2, ceil_mode=True), 0.1)
    assert pooled == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("chunk", [2 ** 24, 5])
def test_batch_p2p_gradcheck(chunk):
    s = randn(2, 3, 3, 3, seed=0, grad=True)
    t = randn(2, 4, 3, 3, seed=1)
    assert torch.autograd.gradcheck(lambda x: batch_p2p(x, t, 0.5, 1, chunk_elements=chunk), (s,))


def test_chunking_changes_neither_value_nor_gradient():
    t = randn(3, 4, 3, 5, seed=1)
    grads, values = [], []
    for chunk in (2 ** 24, 45, 1):
        s = randn(3, 3, 3, 5, seed=0, grad=True)
        loss = batch_p2p(s, t, 0.1, 1, chunk_elements=chunk)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(s.grad)
    assert values[1] == pytest.approx(values[0], rel=1e-12) and values[2] == pytest.approx(values[0], rel=1e-12)
    assert torch.allclose(grads[1], grads[0], rtol=1e-10) and torch.allclose(grads[2], grads[0], rtol=1e-10)


# ---------------------------------------------------------------------------------- memory terms
@pytest.mark.parametrize("tau_c,tau_kd", [(0.1, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("chunk", [2 ** 24, 10])
def test_memory_kl_matches_the_loop_reference(tau_c, tau_kd, chunk):
    s = F.normalize(randn(9, 5, seed=0), dim=1)
    t = F.normalize(randn(9, 5, seed=1), dim=1)
    v = F.normalize(randn(12, 5, seed=2), dim=1)
    got = float(memory_kl(s, t, v, tau_c, tau_kd, chunk))
    assert got == pytest.approx(ref_memory(s, t, v, tau_c, tau_kd), rel=1e-9)
    assert float(memory_kl(t, t, v, tau_c, tau_kd, chunk)) == pytest.approx(0.0, abs=1e-12)


def test_memory_kl_gradcheck_and_no_gradient_to_teacher_or_queue():
    s = F.normalize(randn(6, 4, seed=0), dim=1).requires_grad_(True)
    t = F.normalize(randn(6, 4, seed=1), dim=1).requires_grad_(True)
    v = F.normalize(randn(8, 4, seed=2), dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: memory_kl(x, t, v, 0.3, 2.0, 9), (s,))
    memory_kl(s, t, v, 0.1, 1.0).backward()
    assert t.grad is None and v.grad is None


# ------------------------------------------------------------------------------------- queues
def test_enqueue_on_a_crafted_label_map_matches_the_loop_reference():
    m = method(pixel_update_freq=3)
    mask = crafted_mask()
    labels = nearest_labels(mask, (3, 5))
    assert int(labels[0, 2, 4]) == 2 and int((labels[0] == 2).sum()) == 1  # the single-pixel class
    t_norm = F.normalize(randn(2, 5, 3, 5, seed=3), dim=1)
    before = {k: v.clone() for k, v in m.state_dict().items() if "queue" in k}
    replay = torch.Generator().set_state(m.ctx.generator.get_state())
    m.enqueue(t_norm, labels)
    want = ref_enqueue(before["pixel_queue"], before["pixel_queue_ptr"].tolist(), before["region_queue"],
                       before["region_queue_ptr"].tolist(), t_norm, labels, replay, 3)
    assert torch.allclose(m.pixel_queue, want[0], rtol=1e-12, atol=1e-14)
    assert m.pixel_queue_ptr.tolist() == want[1]
    assert torch.allclose(m.region_queue, want[2], rtol=1e-12, atol=1e-14)
    assert m.region_queue_ptr.tolist() == want[3]
    # per-class counts (at the 3 x 5 feature size): class 0 only in image 0 (3 pixels, 1 region), class 1
    # in both (3 + 3, 2 regions), the single-pixel class 2 once (K' = 1), class 3 in image 1 (4 pixels -> 3)
    assert m.pixel_queue_ptr.tolist() == [3, 6, 1, 3] and m.region_queue_ptr.tolist() == [1, 2, 1, 1]
    assert torch.equal(replay.get_state(), m.ctx.generator.get_state())


def test_enqueued_pixels_are_class_pure_and_ignore_pixels_never_enter():
    m = method(pixel_update_freq=4, pixel_memory_size=40)
    mask = crafted_mask()
    labels = nearest_labels(mask, (3, 5))
    t_norm = F.normalize(randn(2, 5, 3, 5, seed=4), dim=1)
    m.enqueue(t_norm, labels)
    rows = t_norm.permute(0, 2, 3, 1).reshape(-1, 5)
    lab = labels.reshape(-1)
    for k in range(4):
        written = m.pixel_queue[k, :int(m.pixel_queue_ptr[k])]
        for r in written:
            match = (rows - r).abs().sum(1) < 1e-12
            assert match.any() and (lab[match] == k).all()  # a pixel of class k, never an ignore one
    ignore_rows = rows[lab == IGNORE]
    for q in (m.pixel_queue, m.region_queue):
        flat = q.reshape(-1, 5)
        assert ((flat[:, None] - ignore_rows[None]).abs().sum(-1) > 1e-9).all()


def test_region_rows_are_normalised_class_means():
    m = method()
    mask = crafted_mask()
    labels = nearest_labels(mask, (3, 5))
    t_norm = F.normalize(randn(2, 5, 3, 5, seed=5), dim=1)
    m.enqueue(t_norm, labels)
    for k, image, slot in ((0, 0, 0), (1, 0, 0), (1, 1, 1), (2, 0, 0), (3, 1, 0)):
        sel = labels[image] == k
        mean = t_norm[image][:, sel].mean(1)
        assert torch.allclose(m.region_queue[k, slot], mean / mean.norm(), rtol=1e-12)


def test_pixel_queue_fifo_pointer_and_the_wrap_rule():
    m = method(pixel_memory_size=10, pixel_update_freq=4, pixel_contrast_size=4, region_memory_size=3,
               region_contrast_size=2, ctx=context(k=2))
    labels = torch.zeros(1, 3, 3, dtype=torch.long)  # 9 pixels of class 0 per step, K' = 4
    ptrs, regions = [], []
    for step in range(5):
        t_norm = F.normalize(randn(1, 5, 3, 3, seed=10 + step), dim=1)
        before = m.pixel_queue[0].clone()
        m.enqueue(t_norm, labels)
        changed = ((m.pixel_queue[0] - before).abs().sum(1) > 0).nonzero().flatten().tolist()
        ptrs.append(int(m.pixel_queue_ptr[0]))
        regions.append(int(m.region_queue_ptr[0]))
        if step == 2:
            assert changed == [6, 7, 8, 9]  # ptr 8 + 4 >= 10: the LAST four rows, pointer back to 0
        if step == 3:
            assert changed == [0, 1, 2, 3]
    assert ptrs == [4, 8, 0, 4, 8]
    assert regions == [1, 2, 0, 1, 2]  # region pointer: +1 per image with the class, mod N_r
    assert m.pixel_queue_ptr[1] == 0 and m.region_queue_ptr[1] == 0  # an absent class is untouched

    exact = method(pixel_memory_size=8, pixel_update_freq=4, pixel_contrast_size=4, ctx=context(k=2))
    for want in (4, 0):  # 4 + 4 >= 8 also resets (the code's ">=")
        exact.enqueue(F.normalize(randn(1, 5, 3, 3, seed=want), dim=1), labels)
        assert int(exact.pixel_queue_ptr[0]) == want


def test_reference_compat_enqueues_raster_positions_whatever_their_class():
    labels = torch.full((1, 3, 5), 1, dtype=torch.long)
    labels[0, 2, :] = 0  # class 0: the last row (5 pixels); the reference takes positions 0..4 instead
    t_norm = F.normalize(randn(1, 5, 3, 5, seed=6), dim=1)
    rows = t_norm.permute(0, 2, 3, 1).reshape(-1, 5)
    for compat, allowed in ((True, range(0, 5)), (False, range(10, 15))):
        m = method(reference_compat=compat, pixel_update_freq=3)
        replay = torch.Generator().set_state(m.ctx.generator.get_state())
        before = {k: v.clone() for k, v in m.state_dict().items() if "queue" in k}
        m.enqueue(t_norm, labels)
        for r in m.pixel_queue[0, :3]:
            pos = ((rows - r).abs().sum(1) < 1e-12).nonzero().flatten().tolist()
            assert len(pos) == 1 and pos[0] in allowed
        want = ref_enqueue(before["pixel_queue"], before["pixel_queue_ptr"].tolist(), before["region_queue"],
                           before["region_queue_ptr"].tolist(), t_norm, labels, replay, 3, compat=compat)
        assert torch.allclose(m.pixel_queue, want[0], rtol=1e-12)


def test_queues_start_as_normalised_noise_from_the_generator():
    m = method()
    assert m.pixel_queue.shape == (4, 12, 5) and m.region_queue.shape == (4, 5, 5)
    assert torch.allclose(m.pixel_queue.norm(dim=2), torch.ones(4, 12, dtype=torch.float64))
    assert torch.allclose(m.region_queue.norm(dim=2), torch.ones(4, 5, dtype=torch.float64))
    assert torch.equal(m.pixel_queue, method().pixel_queue)
    assert not torch.equal(m.pixel_queue, method(ctx=context(seed=1)).pixel_queue)
    names = {n for n, _ in m.named_buffers()}
    assert {"pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr"} <= names
    assert not any("queue" in n for n, _ in m.named_parameters())


# ---------------------------------------------------------------------------------- the method
def test_method_equals_the_reference_replayed_from_the_generator():
    """Every term against the loop references: projection head (C_s=3 -> C_t=5, training BN) by
    loops, enqueue before the loss, one shared queue index set per class, ignore pixels and a
    single-pixel class, labels at twice the feature size, odd 3 x 5 map."""
    m = method()
    student, teacher, batch = outputs(crafted_mask())
    before = {k: v.clone() for k, v in m.state_dict().items() if "queue" in k}
    replay = torch.Generator().set_state(m.ctx.generator.get_state())
    got = {k: float(v) for k, v in m.terms(student, teacher, batch, Progress(0, 1)).items()}

    s, t = student.features["head"], teacher.features["head"]
    labels = nearest_labels(batch.mask, (3, 5))
    t_norm = F.normalize(t, dim=1)
    p_q, _, r_q, _ = ref_enqueue(before["pixel_queue"], before["pixel_queue_ptr"].tolist(), before["region_queue"],
                                 before["region_queue_ptr"].tolist(), t_norm, labels, replay, 3)
    k_p, k_r = 8 // 4 + 1, 4 // 4 + 1
    p_idx = torch.randperm(12, generator=replay)[:k_p]
    r_idx = torch.randperm(5, generator=replay)[:k_r]
    v_p = torch.cat([p_q[k, p_idx] for k in range(4)])  # class by class, same rows for every class
    v_r = torch.cat([r_q[k, r_idx] for k in range(4)])
    proj = ref_projection(s, m.projector)
    valid = labels.reshape(-1) != IGNORE
    s_rows = torch.tensor([v for i in range(2) for v in pixels(proj, i)], dtype=torch.float64)[valid]
    t_rows = torch.tensor([v for i in range(2) for v in pixels(t, i)], dtype=torch.float64)[valid]
    assert v_p.shape == (4 * k_p, 5) and s_rows.shape[0] == int(valid.sum()) == 20
    assert got["memory_p2p"] == pytest.approx(ref_memory(s_rows, t_rows, v_p, 0.1, 1.0), rel=1e-9)
    assert got["memory_p2r"] == pytest.approx(ref_memory(s_rows, t_rows, v_r, 0.1, 1.0), rel=1e-9)
    assert got["batch_p2p"] == pytest.approx(ref_batch_p2p(s, t, 0.1), rel=1e-9)
    assert torch.equal(replay.get_state(), m.ctx.generator.get_state())  # nothing else was drawn


def test_gradients_reach_student_and_projection_head_never_teacher_or_queues():
    m = method()
    student, teacher, batch = outputs(crafted_mask())
    teacher.features["head"].requires_grad_(True)
    terms = m.terms(student, teacher, batch, Progress(0, 1))
    assert set(terms) == set(m.weights()) == {"batch_p2p", "memory_p2p", "memory_p2r"}
    for name in ("memory_p2p", "memory_p2r"):
        m.zero_grad()
        terms[name].backward(retain_graph=True)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())
    sum(terms.values()).backward()
    assert student.features["head"].grad.abs().sum() > 0 and teacher.features["head"].grad is None


def test_identical_features_and_an_identity_projection_give_zero():
    ctx = context(c_s=5, c_t=5)
    m = method(ctx=ctx)
    with torch.no_grad():
        for conv in (m.projector[0], m.projector[3]):
            conv.weight.copy_(torch.eye(5, dtype=torch.float64)[:, :, None, None])
    m.projector.eval()  # running stats 0 / 1: BN only rescales; positive features pass the ReLU
    x = randn(2, 5, 3, 5, seed=7).abs() + 0.01
    student = SegOutput(None, None, {"head": x.clone().requires_grad_(True)})
    teacher = SegOutput(None, None, {"head": x.clone()})
    terms = m.terms(student, teacher, Batch(None, crafted_mask()), Progress(0, 1))
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-12), name


def test_no_anchor_gives_exact_zero_in_the_graph_and_draws_nothing():
    m = method()
    mask = torch.full((2, 6, 10), IGNORE, dtype=torch.long)
    student, teacher, batch = outputs(mask)
    state = m.ctx.generator.get_state()
    queues = {k: v.clone() for k, v in m.state_dict().items() if "queue" in k}
    terms = m.terms(student, teacher, batch, Progress(0, 1))
    assert float(terms["memory_p2p"]) == 0.0 and float(terms["memory_p2r"]) == 0.0
    (terms["memory_p2p"] + terms["memory_p2r"]).backward()
    g = student.features["head"].grad
    assert torch.isfinite(g).all() and g.abs().sum() == 0
    assert all(p.grad is not None for p in m.projector.parameters())
    assert torch.equal(m.ctx.generator.get_state(), state)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in queues.items())
    assert float(terms["batch_p2p"]) > 0  # the mini-batch term has no ignore mask (spec 7.1)


def test_replay_with_the_same_generator_and_independence_from_the_global_rng():
    def run(seed, global_seed, steps=3):
        torch.manual_seed(global_seed)
        m = method(ctx=context(seed=seed))
        values = []
        for step in range(steps):
            student, teacher, batch = outputs(crafted_mask(), seed=step)
            values.append([float(v) for v in m.terms(student, teacher, batch, Progress(step, steps)).values()])
        return values, m.pixel_queue.clone()

    a, qa = run(0, 0)
    b, qb = run(0, 123)
    c, qc = run(1, 0)
    assert a == b and torch.equal(qa, qb)
    assert a != c and not torch.equal(qa, qc)


def test_state_dict_round_trips_queues_and_pointers():
    m1 = method(ctx=context(seed=0))
    for step in range(3):
        student, teacher, batch = outputs(crafted_mask(), seed=step)
        m1.terms(student, teacher, batch, Progress(step, 4))
    assert m1.pixel_queue_ptr.sum() > 0 and m1.region_queue_ptr.sum() > 0
    buffer = io.BytesIO()
    torch.save(m1.state_dict(), buffer)
    buffer.seek(0)
    m2 = method(ctx=context(seed=42))  # other queue noise and projector
    assert not torch.equal(m2.pixel_queue, m1.pixel_queue)
    m2.load_state_dict(torch.load(buffer))
    for (n1, b1), (n2, b2) in zip(m1.named_buffers(), m2.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)
    m2.ctx.generator.set_state(m1.ctx.generator.get_state())
    student, teacher, batch = outputs(crafted_mask(), seed=9)
    one = {k: float(v) for k, v in m1.terms(student, teacher, batch, Progress(3, 4)).items()}
    two = {k: float(v) for k, v in m2.terms(student, teacher, batch, Progress(3, 4)).items()}
    assert one == two
    assert torch.equal(m1.pixel_queue, m2.pixel_queue) and torch.equal(m1.pixel_queue_ptr, m2.pixel_queue_ptr)


def test_weights_and_switched_off_terms():
    m = method()
    assert m.weights() == {"batch_p2p": 1.0, "memory_p2p": 0.1, "memory_p2r": 0.1}
    assert m.pixel_per_class == 3 and m.region_per_class == 2
    off = method(memory_p2p_weight=0.0, memory_p2r_weight=0.0)
    assert off.projector is None and not list(off.buffers()) and off.weights() == {"batch_p2p": 1.0}
    student, teacher, batch = outputs(crafted_mask())
    assert set(off.terms(student, teacher, batch, Progress(0, 1))) == {"batch_p2p"}
    only_region = method(batch_p2p_weight=0.0, memory_p2p_weight=0.0)
    assert set(only_region.terms(student, teacher, batch, Progress(0, 1))) == {"memory_p2r"}
    defaults = CIRKD({}, context(k=19))  # the reference's per-class counts for Cityscapes
    assert (defaults.pixel_per_class, defaults.region_per_class) == (216, 54)
    assert defaults.pixel_queue.shape == (19, 20000, 5) and defaults.region_queue.shape == (19, 2000, 5)


def test_teacher_feature_of_another_size_is_resized():
    m = method()
    student, teacher, batch = outputs(crafted_mask())
    teacher.features["head"] = randn(2, 5, 6, 10, seed=3)
    terms = m.terms(student, teacher, batch, Progress(0, 1))
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in terms.values())


@pytest.mark.parametrize("cfg,match", [
    ({"batch_p2p_weight": -1.0}, "batch_p2p_weight"), ({"memory_p2r_weight": -0.1}, "memory_p2r_weight"),
    ({"batch_p2p_tau": 0.0}, "batch_p2p_tau"), ({"contrast_tau": -1.0}, "contrast_tau"),
    ({"contrast_kd_tau": 0.0}, "contrast_kd_tau"), ({"pixel_memory_size": 0}, "pixel_memory_size"),
    ({"pixel_contrast_size": 100}, "pixel_contrast_size"), ({"region_contrast_size": 40}, "region_contrast_size"),
    ({"pixel_update_freq": 13}, "pixel_update_freq"), ({"batch_pool": 0}, "batch_pool"),
    ({"chunk_elements": 0}, "chunk_elements"), ({"feature": "neck"}, "feature")])
def test_bad_config_is_refused_with_the_key_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        CIRKD({**SMALL, **cfg}, context())


def test_a_label_outside_the_classes_is_refused():
    m = method()
    mask = crafted_mask()
    mask[0, 2, 2] = 7  # label row 2, column 2: kept by the nearest resize
    student, teacher, batch = outputs(mask)
    with pytest.raises(ValueError, match="label 7"):
        m.terms(student, teacher, batch, Progress(0, 1))


# ------------------------------------------------------------------------- config and a real run
def test_yaml_defaults_validate_and_compose_with_kd():
    from harness.config import load_config
    from harness.errors import ConfigError

    cfg = load_config(["+method=[kd,cirkd]"])
    assert set(cfg["method"]) == {"kd", "cirkd"}
    assert cfg["method"]["cirkd"] == vars(CIRKD.Config())  # the yaml states the schema's defaults
    cfg = load_config(["+method=cirkd", "method.cirkd.memory_p2p_weight=0.01", "method.cirkd.contrast_tau=0.2"])
    assert cfg["method"]["cirkd"]["memory_p2p_weight"] == 0.01 and cfg["method"]["cirkd"]["contrast_tau"] == 0.2
    with pytest.raises(ConfigError, match="pixel_memory_size"):
        load_config(["+method=cirkd", "method.cirkd.pixel_memory_size=many"])


def test_distilled_run_trains_the_projection_head(tiny, monkeypatch):
    from harness.config import load_config

    built = []
    original = harness.engine.train.build_methods

    def capture(*args, **kwargs):
        built.extend(original(*args, **kwargs))
        return built

    monkeypatch.setattr(harness.engine.train, "build_methods", capture)
    overrides = [o if o != "student.head_channels=16" else "student.head_channels=8" for o in tiny("+method=cirkd")]
    cfg = load_config(overrides + ["method.cirkd.pixel_memory_size=200", "method.cirkd.region_memory_size=20",
                                   "method.cirkd.pixel_contrast_size=900", "method.cirkd.region_contrast_size=90"])
    record = harness.engine.train.run(cfg, teacher=teacher_for(cfg)).record
    assert record["status"] == "completed"
    terms = record["extra_json"]["last_loss_terms"]
    for name in ("cirkd.batch_p2p", "cirkd.memory_p2p", "cirkd.memory_p2r"):
        assert math.isfinite(terms[name]) and terms[name] > 0, name
    (m,) = built
    assert m.projector[0].weight.shape[:2] == (16, 8)  # student 8 -> teacher 16 channels
    for p in m.projector.parameters():  # gradients of the last step stay after optimizer.step()
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert int(m.pixel_queue_ptr.sum()) > 0
