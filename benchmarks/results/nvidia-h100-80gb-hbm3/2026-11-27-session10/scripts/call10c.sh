#!/usr/bin/env bash
# Session 10, call C: host cost of HEAD against BASE (custom-op calls, block steps with and without the
# chunked attention backward), host profile at 512², then the compiled tests of the new code.
BASE=89eba8a
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 --modes fwd+bwd --variants fused"
step hostbench_head "python3 .gpu/hostbench.py"
step hostbench_base "$B0 python3 $ROOT/.gpu/hostbench.py"
step host512_head "python3 benchmarks/profile_block.py --grid 512 --batch 2 --host --steps 20 --rows 45"
step scal512_base1 "$B0 python3 $SCAL"
step scal512_head1 "python3 $SCAL"
step scal512_base2 "$B0 python3 $SCAL"
step scal512_head2 "python3 $SCAL"
step tests_norm_linear "$T tests/test_norm_linear.py"
step tests_fused_model "$T tests/test_fused_model.py"
step tests_attention_out "$T tests/test_attention_fn.py -k 'out_proj or bad_inputs or qk_is_not_saved'"
echo "done after $(($(date +%s) - T0)) s"
