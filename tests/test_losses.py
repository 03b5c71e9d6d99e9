"""DINO global and local losses (glsd.loss.dino) against naive loops."""
import pytest
import torch

from glsd.loss.dino import Center, DINOGlobalLoss, DINOLocalLoss, teacher_probs, view_pairs
from glsd.loss.matching import Matches

TS, TT, M = 0.1, 0.05, 0.9


def _ce(t_logits, center, s_logits):
    """-sum softmax((t - c)/Tt) * log_softmax(s/Ts) for one teacher/student vector pair."""
    p = torch.softmax((t_logits.double() - center.double()) / TT, dim=-1)
    return -(p * torch.log_softmax(s_logits.double() / TS, dim=-1)).sum()


def naive_global(student, teacher, center):
    vs, b, _ = student.shape
    vt = teacher.shape[0]
    total, pairs = 0.0, 0
    for t in range(vt):
        for s in range(vs):
            if s == t:
                continue
            total += sum(_ce(teacher[t, i], center[0], student[s, i]) for i in range(b)) / b
            pairs += 1
    return total / pairs


def _teacher_target(teacher_cells, center, match, p, i, c):
    """The matched teacher probabilities of one student cell: one cell's, or the weighted
    sum over a soft match's candidates (double precision)."""
    def probs(row):
        return torch.softmax((teacher_cells[row].double() - center.double()) / TT, dim=-1)
    if match.weight is None:
        return probs(match.index[p, i, c])
    return sum(match.weight[p, i, c, j].double() * probs(match.index[p, i, c, j])
               for j in range(match.index.shape[-1]))


def naive_local(groups, teacher, pairs, matches, center, normalize):
    """Per pair: batch mean of sum_cells valid*CE / Ns ('all') or mean over valid cells; hard
    or weighted (soft) matches."""
    total, n_pairs = 0.0, 0
    for logits, (t_idx, s_idx), m in zip(groups, pairs, matches):
        _, b, ns, _ = logits.shape
        for p in range(len(t_idx)):
            t, s = int(t_idx[p]), int(s_idx[p])
            acc, n_valid = 0.0, 0
            for i in range(b):
                for c in range(ns):
                    if m.valid[p, i, c]:
                        target = _teacher_target(teacher[t, i], center, m, p, i, c)
                        acc = acc - (target * torch.log_softmax(logits[s, i, c].double() / TS, -1)).sum()
                        n_valid += 1
            total = total + (acc / (b * ns) if normalize == "all" else acc / max(n_valid, 1))
            n_pairs += 1
    return total / n_pairs


# ---------------------------------------------------------------------------------------
# view pairs

@pytest.mark.parametrize("vt,first,n", [(2, 0, 2), (2, 2, 6), (3, 0, 3), (2, 0, 5), (1, 1, 4)])
def test_view_pairs_all_but_same_view(vt, first, n):
    t, s = view_pairs(vt, first, n)
    got = sorted(zip(t.tolist(), s.tolist()))
    want = sorted((a, b) for a in range(vt) for b in range(n) if a != b + first)
    assert got == want
    assert t.dtype == torch.long and s.dtype == torch.long
    assert all(a != b + first for a, b in got)


def test_view_pairs_counts():
    assert len(view_pairs(2, 0, 2)[0]) == 2  # (0,1), (1,0)
    assert len(view_pairs(2, 2, 8)[0]) == 16  # locals never coincide with teacher views
    assert sum(len(view_pairs(2, f, n)[0]) for f, n in ((0, 2), (2, 8))) == 18  # the paper's 18


# ---------------------------------------------------------------------------------------
# global loss

@pytest.mark.parametrize("vt,vs", [(2, 2), (2, 5), (1, 3)])
def test_global_loss_matches_naive(vt, vs):
    torch.manual_seed(vt * 10 + vs)
    b, k = 3, 7
    student, teacher = torch.randn(vs, b, k), torch.randn(vt, b, k)
    loss_fn = DINOGlobalLoss(k, student_temp=TS, center_momentum=M)
    old = torch.randn(1, k) * 0.3
    loss_fn.center.center.copy_(old)
    loss = loss_fn(student, teacher, TT)
    assert loss.ndim == 0
    torch.testing.assert_close(loss.double(), naive_global(student, teacher, old), rtol=1e-5, atol=1e-6)


def test_global_loss_center_update_after_use():
    torch.manual_seed(0)
    b, k = 4, 5
    student, teacher = torch.randn(3, b, k), torch.randn(2, b, k)
    loss_fn = DINOGlobalLoss(k, student_temp=TS, center_momentum=M)
    assert torch.equal(loss_fn.center.center, torch.zeros(1, k))
    first = loss_fn(student, teacher, TT)
    # the first call used the zero centre ...
    torch.testing.assert_close(first.double(), naive_global(student, teacher, torch.zeros(1, k)),
                               rtol=1e-5, atol=1e-6)
    # ... then moved it: m * 0 + (1 - m) * mean over views and batch
    c1 = (1 - M) * teacher.reshape(-1, k).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.center, c1)
    second = loss_fn(student, teacher, TT)
    torch.testing.assert_close(second.double(), naive_global(student, teacher, c1), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(first, second)
    c2 = M * c1 + (1 - M) * teacher.reshape(-1, k).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.center, c2)


def test_global_loss_gradient_only_to_student():
    student = torch.randn(3, 2, 6, requires_grad=True)
    teacher = torch.randn(2, 2, 6, requires_grad=True)
    DINOGlobalLoss(6)(student, teacher, TT).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None
    # The student's gradient is the naive loop's (in double precision).
    reference = student.detach().double().requires_grad_()
    naive_global(reference, teacher.detach().double(), torch.zeros(1, 6, dtype=torch.float64)).backward()
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-5, atol=1e-7)


def test_global_loss_same_view_excluded():
    # Student view s agrees with teacher view t != s and disagrees with its own teacher view:
    # with the s == t terms excluded the loss is ~0; counting them would make it large.
    k = 4
    teacher = torch.tensor([[[5.0, 0, 0, 0]], [[0, 5.0, 0, 0]]])
    student = teacher.flip(0).clone()  # view 0 looks like teacher view 1, and the reverse
    loss = DINOGlobalLoss(k, student_temp=TS)(student, teacher, TT)
    torch.testing.assert_close(loss.double(), naive_global(student, teacher, torch.zeros(1, k)))
    assert loss.item() < 1e-3
    crossed = DINOGlobalLoss(k, student_temp=TS)(teacher.clone(), teacher, TT)  # the reverse
    assert crossed.item() > 10


def test_teacher_probs_and_center_module():
    logits, c = torch.randn(2, 3, 5), torch.randn(1, 5)
    torch.testing.assert_close(teacher_probs(logits, c, 0.5), torch.softmax((logits - c) / 0.5, -1))
    center = Center(5, momentum=0.8)
    x = torch.randn(6, 5)
    center.update(x)
    torch.testing.assert_close(center.center, 0.2 * x.mean(0, keepdim=True))


# ---------------------------------------------------------------------------------------
# local loss

def _local_setup(seed=0, with_empty_pair=True):
    torch.manual_seed(seed)
    vt, vl, b, k = 2, 3, 2, 5
    nt = 4  # teacher grid 2x2
    ns_groups = (4, 1)  # global views 2x2, local views 1x1 (different Ns)
    teacher = torch.randn(vt, b, nt, k)
    groups = [torch.randn(vt, b, ns_groups[0], k), torch.randn(vl, b, ns_groups[1], k)]
    pairs = [view_pairs(vt, 0, vt), view_pairs(vt, vt, vl)]
    matches = []
    for (t_idx, _), ns in zip(pairs, ns_groups):
        p = len(t_idx)
        index = torch.randint(0, nt, (p, b, ns))
        valid = torch.rand(p, b, ns) > 0.4
        matches.append(Matches(index, valid))
    if with_empty_pair:
        matches[1].valid[0] = False  # a pair with no valid cell
        matches[0].valid[0, 0] = True  # and one sample fully valid
    return groups, teacher, pairs, matches, k


@pytest.mark.parametrize("normalize", ["all", "valid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_local_loss_matches_naive(normalize, seed):
    groups, teacher, pairs, matches, k = _local_setup(seed)
    assert sum(len(t) for t, _ in pairs) == 2 + 6
    loss_fn = DINOLocalLoss(k, student_temp=TS, center_momentum=M, normalize=normalize)
    old = torch.randn(1, k) * 0.3
    loss_fn.center.center.copy_(old)
    loss = loss_fn(groups, teacher, pairs, matches, TT)
    assert loss.ndim == 0
    want = naive_local(groups, teacher, pairs, matches, old, normalize)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    # centre: EMA of the teacher mean over views, batch and cells, after the loss used the old one
    c1 = M * old + (1 - M) * teacher.reshape(-1, k).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.center, c1)


def test_local_loss_all_vs_valid_differ_and_all_valid_agree():
    groups, teacher, pairs, matches, k = _local_setup(3)
    a = DINOLocalLoss(k, TS, normalize="all")(groups, teacher, pairs, matches, TT)
    v = DINOLocalLoss(k, TS, normalize="valid")(groups, teacher, pairs, matches, TT)
    assert not torch.isclose(a, v)
    full = [Matches(m.index, torch.ones_like(m.valid)) for m in matches]
    a = DINOLocalLoss(k, TS, normalize="all")(groups, teacher, pairs, full, TT)
    v = DINOLocalLoss(k, TS, normalize="valid")(groups, teacher, pairs, full, TT)
    torch.testing.assert_close(a, v)


def test_local_loss_masked_cells_count_as_zero():
    # 'all': halving the valid cells of a pair with equal CE per cell halves its term
    k, b = 3, 1
    teacher = torch.zeros(1, b, 2, k)
    student = torch.zeros(2, b, 2, k)  # uniform: CE = ln(3) per cell
    pairs = [(torch.tensor([0]), torch.tensor([1]))]
    idx = torch.zeros(1, b, 2, dtype=torch.long)
    one = Matches(idx, torch.tensor([[[True, False]]]))
    two = Matches(idx, torch.tensor([[[True, True]]]))
    loss_all = DINOLocalLoss(k, TS, normalize="all")
    ln3 = torch.log(torch.tensor(3.0))
    torch.testing.assert_close(loss_all([student], teacher, pairs, [one], TT), ln3 / 2)
    torch.testing.assert_close(loss_all([student], teacher, pairs, [two], TT), ln3)
    loss_valid = DINOLocalLoss(k, TS, normalize="valid")
    torch.testing.assert_close(loss_valid([student], teacher, pairs, [one], TT), ln3)


def test_local_loss_gradients():
    groups, teacher, pairs, matches, k = _local_setup(4, with_empty_pair=False)
    groups = [g.requires_grad_() for g in groups]
    teacher.requires_grad_()
    DINOLocalLoss(k, TS)(groups, teacher, pairs, matches, TT).backward()
    assert all(g.grad is not None and torch.isfinite(g.grad).all() for g in groups)
    assert teacher.grad is None


@pytest.mark.parametrize("normalize", ["all", "valid"])
def test_local_loss_gradient_matches_naive(normalize):
    # The loss sums matched targets per student cell before it meets the student logits:
    # its gradient must still be the naive per-pair cross-entropy's.
    groups, teacher, pairs, matches, k = _local_setup(5)
    fast = [g.clone().requires_grad_() for g in groups]
    slow = [g.clone().double().requires_grad_() for g in groups]
    loss_fn = DINOLocalLoss(k, TS, normalize=normalize)
    center = loss_fn.center.center.clone()
    loss_fn(fast, teacher, pairs, matches, TT).backward()
    naive_local(slow, teacher, pairs, matches, center, normalize).backward()
    for f, s in zip(fast, slow):
        assert s.grad.abs().max() > 1e-3  # a real gradient, not all zeros
        torch.testing.assert_close(f.grad.double(), s.grad, rtol=1e-4, atol=1e-6)


def test_local_loss_with_a_group_without_pairs():
    # One global view (crops.num_global=1): the global group has no (t, s != t) pair and adds
    # no term; the local group's loss is unchanged and still matches the naive loop.
    torch.manual_seed(6)
    b, k, nt = 2, 5, 4
    teacher = torch.randn(1, b, nt, k)
    groups = [torch.randn(1, b, nt, k), torch.randn(2, b, 1, k)]
    pairs = [view_pairs(1, 0, 1), view_pairs(1, 1, 2)]
    assert len(pairs[0][0]) == 0
    matches = [Matches(torch.zeros(0, b, nt, dtype=torch.long), torch.zeros(0, b, nt, dtype=torch.bool)),
               Matches(torch.randint(0, nt, (2, b, 1)), torch.ones(2, b, 1, dtype=torch.bool))]
    loss_fn = DINOLocalLoss(k, TS)
    center = loss_fn.center.center.clone()
    loss = loss_fn(groups, teacher, pairs, matches, TT)
    torch.testing.assert_close(loss.double(), naive_local(groups, teacher, pairs, matches, center, "all"),
                               rtol=1e-5, atol=1e-6)


def test_local_loss_one_group_holding_every_view_matches_naive():
    # Global and local crops of one size form one group: its global views are in one pair
    # fewer than its local views (no pair with their own teacher view), so the per-cell bags
    # carry zero-weight fillers. Value and gradient must still be the naive loop's.
    torch.manual_seed(7)
    vt, vl, b, k, n = 2, 3, 2, 5, 4
    teacher = torch.randn(vt, b, n, k)
    group = torch.randn(vt + vl, b, n, k)
    t_idx, s_idx = view_pairs(vt, 0, vt + vl)
    assert torch.bincount(s_idx).tolist() == [1, 1, 2, 2, 2]
    match = Matches(torch.randint(0, n, (len(t_idx), b, n)), torch.rand(len(t_idx), b, n) > 0.3)
    loss_fn = DINOLocalLoss(k, TS)
    center = loss_fn.center.center.clone()
    fast, slow = group.clone().requires_grad_(), group.clone().double().requires_grad_()
    loss = loss_fn([fast], teacher, [(t_idx, s_idx)], [match], TT)
    want = naive_local([slow], teacher, [(t_idx, s_idx)], [match], center, "all")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    want.backward()
    torch.testing.assert_close(fast.grad.double(), slow.grad, rtol=1e-4, atol=1e-6)


def test_local_loss_on_bf16_logits_matches_fp32_and_leaves_inputs_alone():
    # The training step feeds bf16 logits (autocast): the loss upcasts them, its gradient comes
    # back in bf16, and neither the student's nor the teacher's tensors are edited in place.
    groups, teacher, pairs, matches, k = _local_setup(8)
    teacher16 = teacher.bfloat16()
    teacher_before = teacher16.clone()
    half = [g.bfloat16().requires_grad_() for g in groups]
    full = [g.bfloat16().float().requires_grad_() for g in groups]
    a = DINOLocalLoss(k, TS)(half, teacher16, pairs, matches, TT)
    b = DINOLocalLoss(k, TS)(full, teacher16.float(), pairs, matches, TT)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    a.backward()
    b.backward()
    for h, f in zip(half, full):
        assert h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(h.grad.float(), f.grad, rtol=1e-2, atol=1e-4)
    assert torch.equal(teacher16, teacher_before)
    # fp32 teacher logits: the loss's working copy is a copy, not the caller's tensor
    fp32_teacher = teacher.clone()
    DINOLocalLoss(k, TS)(groups, fp32_teacher, pairs, matches, TT)
    assert torch.equal(fp32_teacher, teacher)


def test_bags_refuse_a_view_in_more_pairs_than_its_slots():
    # 3 pairs over 2 views, all on view 0: 2 slots per view cannot hold them. That must fail
    # loudly, not spill a pair into view 1's bag.
    from glsd.loss.dino import bags_per_student_cell

    rows = torch.arange(3 * 1 * 1 * 1).view(3, 1, 1, 1)
    with pytest.raises((IndexError, RuntimeError)):
        bags_per_student_cell(rows, torch.ones(3, 1, 1, 1), torch.tensor([0, 0, 0]), 2)
    bags, weights = bags_per_student_cell(rows, torch.ones(3, 1, 1, 1), torch.tensor([0, 1, 0]), 2)
    assert bags.tolist() == [[0, 2], [1, 0]] and weights.tolist() == [[1, 1], [1, 0]]
