"""Expert-parallel checks run inside each of N gloo processes (launched by test_expert_parallel.py).

`python ep_checks.py RANK WORLD INIT_FILE TMP_DIR CHECK...`: every rank builds the single-process
layer or model and its expert-parallel twin from the same seed, runs the check and compares
(max abs difference <= 1e-5, float32). One process group serves every check, so the cost of
starting N interpreters is paid once. Prints `ok NAME SECONDS` per check; any failure exits non-zero.

Loss convention of the parity checks (see moebuild/parallel/expert.py): rank r's loss is
sum(y_r * g_r) + aux / N; the sum over ranks is the single-process loss of the concatenated
batch, the replicated parameters' gradients summed over ranks are its gradients, and the expert
gradients arrive complete on the rank holding the expert.
"""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import moebuild
from moebuild.moe.experts import ExpertPool
from moebuild.parallel import average_gradients
from moebuild.spec.errors import BuildError

ATOL = 1e-5
D = 16
EP = None  # expert-parallel ranks; None = the world (EP x DP when smaller: `--ep N` on the command line)


def n_ep(world):
    return EP or world


def close(name, got, want):
    diff = (got.detach().float() - want.detach().float()).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape and diff <= ATOL, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}, max diff {diff}"


def layer_spec(routes, pools, balancing=(), replicate=(), n=1):
    return {"pools": pools, "routes": routes, "balancing": list(balancing),
            "parallel": {"expert_parallel": n, "replicate": list(replicate)}}


def twin_layers(spec, world):
    """(single-process layer, expert-parallel layer) with the same weights."""
    torch.manual_seed(0)
    single = moebuild.build_module(layer_spec(**spec), hidden_size=D)
    for name, param in single.named_parameters():
        if "router" in name:  # larger router weights: decisive top-k choices
            param.data.normal_(0, 1.0)
    ep = moebuild.build_module(layer_spec(**spec, n=n_ep(world)), hidden_size=D)
    ep.load_state_dict(sliced(single.state_dict(), ep))
    return single, ep


def sliced(state, ep_module):
    """The single-process state with each expert-parallel pool's tensors cut to this rank's experts."""
    own = ep_module.state_dict()
    out = {}
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            pool = ep_module.get_submodule(key.rsplit(".", 1)[0])
            tensor = tensor[pool.first_expert: pool.first_expert + pool.num_local_experts]
        out[key] = tensor
    return out


def local(t, rank, world):
    b = t.shape[0] // world
    return t[rank * b:(rank + 1) * b]


def layer_step(layer, x, modality, mask, g, scale=1.0):
    x = x.clone().requires_grad_(True)
    out = layer(x, modality_BS=modality, attention_mask_BS=mask)
    aux = sum(out.aux_losses.values(), torch.zeros(()))
    loss = (out.hidden_states * g).sum() + aux * scale
    loss.backward()
    return out, loss, x.grad


def compare_grads(single, ep, rank, world):
    """Expert gradients against this rank's slice; every other gradient summed over ranks."""
    ep_params = dict(ep.named_parameters())
    for name, param in single.named_parameters():
        mine = ep_params[name]
        pool = ep.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(pool, ExpertPool) and pool.parallel is not None:
            want = param.grad[pool.first_expert: pool.first_expert + pool.num_local_experts]
            got = mine.grad.clone()
            if pool.parallel.replica_group is not None:  # EP x DP: the other groups' tokens reach the replicas
                dist.all_reduce(got, group=pool.parallel.replica_group)
            close(f"grad {name}", got, want)
        else:
            summed = mine.grad.clone()
            dist.all_reduce(summed)
            close(f"grad {name}", summed, param.grad)


def parity(spec, rank, world, B=2, S=6, image=False, padding=True, empty_rank=None, text_only_rank=None):
    """Outputs, aux losses, loss and gradients of the EP layer on each rank's B sequences against
    the single-process layer on all world * B."""
    single, ep = twin_layers(spec, world)
    single.train(), ep.train()
    torch.manual_seed(1)
    x = torch.randn(world * B, S, D)
    g = torch.randn(world * B, S, D)
    modality = torch.randint(0, 2, (world * B, S)) if image else torch.zeros(world * B, S, dtype=torch.long)
    if text_only_rank is not None:  # that rank's image route has no tokens, the others' do
        modality[text_only_rank * B:(text_only_rank + 1) * B] = 0
    mask = torch.ones(world * B, S, dtype=torch.long)
    if padding:
        mask[0, -2:] = 0
        mask[-1, -3:] = 0
    sizes = [B] * world
    if empty_rank is not None:  # that rank brings no tokens at all
        sizes[empty_rank], sizes[(empty_rank + 1) % world] = 0, 2 * B
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])
    ref, ref_loss, ref_dx = layer_step(single, x, modality, mask, g)
    out, loss, dx = layer_step(ep, x[part], modality[part], mask[part], g[part], scale=1.0 / world)
    close("output", out.hidden_states, ref.hidden_states[part])
    for route, groups in ref.router_stats.items():  # router statistics over every rank's tokens
        for group, stats in groups.items():
            for name, value in stats.items():
                close(f"stat {route} {group} {name}", out.router_stats[route][group][name], value)
    for name, value in ref.aux_losses.items():
        close(f"aux {name}", out.aux_losses[name], value)
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    close("loss", summed, ref_loss)
    close("input grad", dx, ref_dx[part])
    compare_grads(single, ep, rank, world)
    return single, ep


TOPK = {"type": "topk", "top_k": 2}
POOL = {"experts": {"num_experts": 4, "intermediate_size": 8}}
TERMS = [{"type": "switch_aux", "coef": 0.1}, {"type": "load_balance", "coef": 0.1}, {"type": "z_loss", "coef": 0.01},
         {"type": "entropy", "coef": 0.01}, {"type": "seq_aux", "coef": 0.1}]


def check_topk(rank, world, tmp):
    parity({"routes": [{"pool": "experts", "router": TOPK}], "pools": POOL, "balancing": TERMS}, rank, world)


def check_shared_expert(rank, world, tmp):
    pools = {"shared": {"num_experts": world, "intermediate_size": 8}, "routed": {"num_experts": 2 * world, "intermediate_size": 8}}
    routes = [{"pool": "shared", "router": {"type": "dense"}},
              {"pool": "routed", "router": {"type": "topk", "top_k": 3, "score": "sigmoid", "normalize": True, "scale": 2.0}}]
    parity({"routes": routes, "pools": pools, "balancing": [{"type": "seq_aux", "coef": 0.1}]}, rank, world)
    # DeepSeek-VL2's 2 shared experts over any N: the shared pool replicated, the routed one sharded
    pools["shared"]["num_experts"] = 2
    _, ep = parity({"routes": routes, "pools": pools, "balancing": [{"type": "seq_aux", "coef": 0.1}],
                    "replicate": ["shared"]}, rank, world)
    assert ep.pools["shared"].parallel is None and ep.pools["routed"].parallel is not None


def check_ltdr(rank, world, tmp):
    routes = [{"tokens": "text", "pool": "experts", "router": TOPK},
              {"tokens": "image", "pool": "experts", "router": {"type": "dynamic_topk", "top_k": 1, "tail_top_k": 3}}]
    spec = {"routes": routes, "pools": POOL, "balancing": [{"type": "load_balance", "coef": 0.1, "tokens": "text"}]}
    parity(spec, rank, world, image=True)
    parity(spec, rank, world, image=True, text_only_rank=world - 1)


def check_empty(rank, world, tmp):
    """Ranks whose experts receive no tokens (every token's choice biased to expert 0), and a rank
    that brings no tokens of its own."""
    spec = {"routes": [{"pool": "experts", "router": {"type": "topk", "top_k": 1, "bias": True}}], "pools": POOL,
            "balancing": [{"type": "switch_aux", "coef": 0.1}]}
    single, ep = twin_layers(spec, world)
    for layer in (single, ep):
        layer.routes[0].router.e_score_correction_bias[1:] = -100.0
    parity_with(single, ep, rank, world)
    parity({"routes": [{"pool": "experts", "router": TOPK}], "pools": POOL, "balancing": TERMS}, rank, world,
           empty_rank=world - 1)


def parity_with(single, ep, rank, world, B=2, S=5):
    torch.manual_seed(3)
    x, g = torch.randn(world * B, S, D), torch.randn(world * B, S, D)
    modality, mask = torch.zeros(world * B, S, dtype=torch.long), torch.ones(world * B, S, dtype=torch.long)
    ref, ref_loss, ref_dx = layer_step(single, x, modality, mask, g)
    out, loss, dx = layer_step(ep, *(local(t, rank, world) for t in (x, modality, mask, g)), scale=1.0 / world)
    close("output", out.hidden_states, local(ref.hidden_states, rank, world))
    close("input grad", dx, local(ref_dx, rank, world))
    compare_grads(single, ep, rank, world)


def check_deepspeed_capacity(rank, world, tmp):
    """deepspeed_top2 with capacity: capacity is computed over each rank's local tokens, so the EP
    output on rank r equals the single-process layer given rank r's batch alone."""
    router = {"type": "deepspeed_top2", "capacity": {"train": 1.0, "eval": 1.0}}
    spec = {"routes": [{"pool": "experts", "router": router, "causal": False}], "pools": POOL,
            "balancing": [{"type": "switch_aux", "coef": 0.1}]}
    single, ep = twin_layers(spec, world)
    for layer in (single, ep):
        layer.routes[0].router.sample_gumbel = lambda logits: torch.cos(logits * 7.0)  # written-out noise
    torch.manual_seed(4)
    x, g = torch.randn(world * 2, 8, D), torch.randn(world * 2, 8, D)
    mask = torch.ones(world * 2, 8, dtype=torch.long)
    x_r, g_r, m_r = (local(t, rank, world) for t in (x, g, mask))
    alone = single(x_r, attention_mask_BS=m_r)
    full = single(x, attention_mask_BS=mask)
    out = ep(x_r, attention_mask_BS=m_r)
    dropped = (alone.router_stats["all->experts"]["all"]["dropped_fraction"])
    close("output", out.hidden_states, alone.hidden_states)
    close("aux switch_aux", out.aux_losses["switch_aux"], full.aux_losses["switch_aux"])
    dropped = torch.tensor([float(dropped)])
    dist.all_reduce(dropped)
    assert dropped > 0, "the check should drop tokens"
    xr = x_r.clone().requires_grad_(True)
    (single(xr, attention_mask_BS=m_r).hidden_states * g_r).sum().backward()
    xe = x_r.clone().requires_grad_(True)
    (ep(xe, attention_mask_BS=m_r).hidden_states * g_r).sum().backward()
    close("input grad", xe.grad, xr.grad)


def check_every_router(rank, world, tmp):
    """Every router type of the schema runs expert-parallel: routing is per rank (expert_choice and
    soft compare only a rank's own tokens, as capacity counts them), so the output and
    input gradient on rank r equal the single-process layer's given rank r's batch (evaluation mode:
    no noise; DeepSpeed's evaluation Gumbel written out)."""
    import typing

    from moebuild.moe.routers.deepspeed import DeepSpeedTop2Router
    from moebuild.schemas import RouterSpec

    kinds = {cls.model_fields["type"].annotation.__args__[0]: cls for cls in typing.get_args(typing.get_args(RouterSpec)[0])}
    torch.manual_seed(6)
    x, g = torch.randn(world * 2, 9, D), torch.randn(world * 2, 9, D)
    modality = torch.randint(0, 2, (world * 2, 9))
    for kind, cls in sorted(kinds.items()):
        if kind == "dynamic_topk":  # its threshold is over every rank's tokens: check_ltdr, against the whole batch
            continue
        spec = {"routes": [{"pool": "experts", "router": cls.example(), "causal": False}], "pools": POOL}
        single, ep = twin_layers(spec, world)
        for layer in (single, ep):
            layer.eval()
            if isinstance(layer.routes[0].router, DeepSpeedTop2Router):
                layer.routes[0].router.sample_gumbel = lambda logits: torch.cos(logits * 7.0)
        x_r, g_r, m_r = (local(t, rank, world) for t in (x, g, modality))
        outs = []
        for layer in (single, ep):
            xr = x_r.clone().requires_grad_(True)
            y = layer(xr, modality_BS=m_r).hidden_states
            (y * g_r).sum().backward()
            outs.append((y, xr.grad))
        close(f"{kind} output", outs[1][0], outs[0][0])
        close(f"{kind} input grad", outs[1][1], outs[0][1])


def check_bias_steps(rank, world, tmp):
    """A few SGD steps with aux-free bias balancing stay equal to the single process, gradients
    synchronised by `average_gradients` (replicated ones averaged as DDP does, expert ones / N)."""
    router = {"type": "topk", "top_k": 2, "score": "sigmoid", "bias": {"update_rate": 0.05}}
    spec = {"routes": [{"pool": "experts", "router": router}], "pools": POOL, "balancing": [{"type": "z_loss", "coef": 0.01}]}
    single, ep = twin_layers(spec, world)
    opt_s = torch.optim.SGD(single.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(ep.parameters(), lr=0.1)
    moved = False
    for step in range(3):
        torch.manual_seed(10 + step)
        x, g = torch.randn(world * 2, 6, D), torch.randn(world * 2, 6, D)
        ones = torch.ones(world * 2, 6, dtype=torch.long)
        opt_s.zero_grad(), opt_e.zero_grad()
        # data-parallel convention (DDP's): rank loss = local part + aux, gradients averaged over ranks
        layer_step(single, x, ones * 0, ones, g / world)
        layer_step(ep, *(local(t, rank, world) for t in (x, ones * 0, ones, g)))
        average_gradients(ep)
        opt_s.step(), opt_e.step()
        single.update_balancing(), ep.update_balancing()
        bias_s, bias_e = (layer.routes[0].router.e_score_correction_bias for layer in (single, ep))
        close(f"bias after step {step}", bias_e, bias_s)
        moved = moved or bool(bias_s.any())
        for name, want in sliced(single.state_dict(), ep).items():
            close(f"{name} after step {step}", ep.state_dict()[name], want)
    assert moved, "the bias never moved"


def micro_spec():
    """micro-moe-llava without DeepSpeed's evaluation-time Gumbel noise, so two models can agree."""
    return moebuild.load_spec("micro-moe-llava", overrides=["moe.routes[0].router.eval_noise=false"])


def micro_model(n=None, seed=0):
    return moebuild.build(micro_spec(), seed=seed, expert_parallel=n)


def check_checkpoint(rank, world, tmp):
    """Single-process checkpoint -> loaded under EP (only this rank's slices) -> saved under EP:
    the same files; and that checkpoint loads in a single process."""
    from safetensors.torch import load_file

    from moebuild import MoEVLMForConditionalGeneration as Model

    tmp = Path(tmp)
    single = micro_model().eval()
    if rank == 0:
        single.save_pretrained(tmp / "single")
    dist.barrier()
    ep = Model.from_pretrained(tmp / "single", expert_parallel=n_ep(world)).eval()
    pool = ep.language.layers[0].mlp.pools["experts"]
    assert pool.gate_up_proj.shape[0] == 4 // n_ep(world), pool.gate_up_proj.shape
    torch.manual_seed(5)
    ids = torch.randint(3, 500, (world * 2, 7))
    close("logits", ep(input_ids=local(ids, rank, world)).logits, single(input_ids=local(ids, rank, world)).logits)
    ep.save_pretrained(tmp / "ep")
    dist.barrier()
    a, b = load_file(tmp / "single" / "model.safetensors"), load_file(tmp / "ep" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("config.json", "spec.yaml"):
        assert (tmp / "single" / name).read_text() == (tmp / "ep" / name).read_text(), name
    again = Model.from_pretrained(tmp / "ep").eval()
    close("logits reloaded", again(input_ids=ids).logits, single(input_ids=ids).logits)
    # a seeded expert-parallel build initialises its experts as the single process does
    built = micro_model(n=n_ep(world)).eval()
    close("seeded init logits", built(input_ids=local(ids, rank, world)).logits, single(input_ids=local(ids, rank, world)).logits)


def check_fsdp(rank, world, tmp):
    """FSDP2 over the replicated weights, experts left to expert parallelism: the gradients of two
    training steps equal `average_gradients` on the unsharded model, and save_pretrained writes the
    same files."""
    from safetensors.torch import load_file

    from moebuild.parallel import average_expert_grads
    from moebuild.parallel.fsdp import fully_shard_replicated

    spec = moebuild.load_spec("micro-moe-llava", overrides=["moe.routes[0].router.eval_noise=false",
                                                            "moe.routes[0].router.capacity=null"])
    plain = moebuild.build(spec, seed=0, expert_parallel=n_ep(world)).eval()
    sharded = fully_shard_replicated(moebuild.build(spec, seed=0, expert_parallel=n_ep(world)).eval())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, sharded)]
    torch.manual_seed(20 + rank)
    ids = torch.randint(3, 500, (2, 12))
    for step in range(2):
        for model, opt in zip((plain, sharded), opts):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
        average_gradients(plain)
        average_expert_grads(sharded)
        want = dict(plain.named_parameters())
        for name, param in sharded.named_parameters():
            if param.grad is None:
                assert want[name].grad is None, name
                continue
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            close(f"fsdp grad {name} step {step}", grad, want[name].grad)
        for opt in opts:
            opt.step()
    tmp = Path(tmp)
    plain.save_pretrained(tmp / "plain")
    sharded.save_pretrained(tmp / "fsdp")
    dist.barrier()
    a, b = load_file(tmp / "plain" / "model.safetensors"), load_file(tmp / "fsdp" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for key in a:
        close(f"saved {key}", b[key], a[key])


def check_checkpoint_errors(rank, world, tmp):
    """A model directory whose config asks for another N names itself; expert_parallel=N reshards."""
    import json

    from moebuild import MoEVLMForConditionalGeneration as Model

    tmp, other = Path(tmp), 4  # at 4 ranks any N dividing 4 experts divides the world too: no error to meet
    if world != 2:
        return
    if rank == 0:
        micro_model().save_pretrained(tmp / "other_n")
        config = json.loads((tmp / "other_n" / "config.json").read_text())
        config["spec"]["moe"]["parallel"]["expert_parallel"] = other
        (tmp / "other_n" / "config.json").write_text(json.dumps(config))
    dist.barrier()
    try:
        Model.from_pretrained(tmp / "other_n")
    except BuildError as exc:
        want = f"config.json: moe.parallel.expert_parallel={other} but the world size is {world}"
        assert want in str(exc), str(exc)
    else:
        raise AssertionError("no error for a checkpoint written for another N")
    model = Model.from_pretrained(tmp / "other_n", expert_parallel=n_ep(world))
    assert model.language.layers[0].mlp.pools["experts"].num_local_experts == 4 // n_ep(world)


def check_errors(rank, world, tmp):
    spec = {"routes": [{"pool": "experts", "router": TOPK}], "pools": {"experts": {"num_experts": 6, "intermediate_size": 8}}}
    for n, message in ((4, "num_experts=6 is not divisible by expert_parallel=4"),
                       (3, f"expert_parallel=3 but the world size is {world}")):
        try:
            moebuild.build_module(layer_spec(**spec, n=n), hidden_size=D)
        except (ValueError, BuildError) as exc:
            assert message in str(exc), str(exc)
        else:
            raise AssertionError(f"no error for expert_parallel={n}")
    try:
        moebuild.build("micro-moe-llava", expert_parallel=3 if world != 3 else 5)
    except BuildError as exc:
        assert "is not divisible by expert_parallel" in str(exc), str(exc)
    else:
        raise AssertionError("no error for micro-moe-llava at expert_parallel=3")


def main():
    global EP
    args = sys.argv[1:]
    if args[0] == "--ep":
        EP, args = int(args[1]), args[2:]
    rank, world, init, tmp, *checks = args
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        for name in checks:
            start = time.perf_counter()
            globals()[f"check_{name}"](rank, world, tmp)
            print(f"ok {name} {time.perf_counter() - start:.2f}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
