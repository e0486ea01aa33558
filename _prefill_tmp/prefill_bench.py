import sys, itertools, torch, triton
sys.path.insert(0, "/tmp/shim"); sys.path.insert(0, "tests")
import vllm_kvquant.kernels.prefill_attention as pa
from test_prefill_attention import make_case
from triton.testing import do_bench

def flops(case):
    qsl = case["query_start_loc"].tolist(); ctx = case["context_lens"].tolist()
    hq, d = case["query"].shape[1:]
    f = 0
    for i in range(len(ctx)):
        n = qsl[i+1]-qsl[i]; f += 4*hq*d*(n*ctx[i] + n*(n+1)/2)
    return f

def bench(name, case, cfgs):
    f = flops(case)
    orig = pa._select_config
    for cfg in cfgs:
        if cfg is not None:
            pa._select_config = lambda hp, gp, mq, it, cfg=cfg: (max(cfg[0]//gp,1), cfg[1], cfg[2], cfg[3])
        try:
            ms = do_bench(lambda: pa.paged_prefill_attention(**case, max_query_len=4096), warmup=25, rep=100)
            print(f"{name:40s} cfg={cfg} {ms*1e3:8.1f} us {f/ms/1e9:7.1f} TFLOP/s", flush=True)
        except Exception as e:
            print(name, cfg, "FAILED", repr(e)[:200])
        pa._select_config = orig


d128 = [None, (128,64,8,3), (128,128,8,2), (128,128,8,3), (128,64,4,3), (128,128,4,2), (64,64,4,3), (128,32,8,3)]
c = make_case(act_dtype=torch.float16, kv_dtype="fp8_e4m3", head_size=128, num_kv_heads=8, group=4, block_size=16, seqs=((2048,1024),)*4, device="cuda")
bench("chunk 4x1k+2k fp16 fp8 g4", c, d128)
c = make_case(act_dtype=torch.bfloat16, kv_dtype="int8", head_size=128, num_kv_heads=8, group=1, block_size=64, seqs=((4096,512),)*4, device="cuda")
bench("chunk 4x512+4k bf16 int8 g1 bs64", c, d128)
c = make_case(act_dtype=torch.float16, head_size=128, num_kv_heads=8, group=4, seqs=((0,4096),)*4, device="cuda")
bench("pure 4x4k fp16", c, d128)
d64 = [None, (128,64,8,3), (128,64,4,3), (128,128,8,2), (128,128,4,3), (64,64,4,3)]
c = make_case(act_dtype=torch.bfloat16, head_size=64, num_kv_heads=8, group=1, block_size=32, seqs=((3000,500),)*8, device="cuda")
bench("chunk 8x500+3000 d64 bf16 fp8", c, d64)
c = make_case(act_dtype=torch.float16, head_size=80, num_kv_heads=8, group=2, block_size=16, seqs=((2000,1000),)*4, device="cuda")
bench("chunk d80 g2", c, d128)
d256 = [None, (128,32,8,2), (128,32,8,3), (64,32,4,3), (128,64,8,2), (64,64,4,2), (128,16,8,3)]
c = make_case(act_dtype=torch.float16, head_size=256, num_kv_heads=4, group=2, block_size=16, seqs=((2048,1024),)*4, device="cuda")
bench("chunk d256 g2", c, d256)
c = make_case(act_dtype=torch.float16, head_size=192, num_kv_heads=4, group=2, block_size=16, seqs=((2048,1024),)*4, device="cuda")
bench("chunk d192 g2", c, d256)
