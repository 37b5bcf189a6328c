# The fastest recipe we know to val loss <= 1.88 on shakespeare_char on a 2-core CPU.
# python prepare.py shakespeare_char && python train.py config/speedrun_shakespeare_char_cpu.py
# Against nanoGPT's CPU recipe (4 layers, 128 wide, AdamW, 2,000 iterations of 12 x 64 tokens):
# the same width and depth, with the changes of recent small-model speedruns (see the README's
# Benchmarks section for what each one buys).
out_dir = "out-speedrun-char-cpu"
dataset = "shakespeare_char"
eval_interval = 150   # evaluate once, at the end: evaluation time counts in a speedrun
eval_at_start = False # nor the untrained model
eval_iters = 20
log_interval = 50

batch_size = 24       # twice nanoGPT's 12 tokens a step: the small matrices use the cores better,
                      # and the optimizer's fixed cost a step (~14 ms) is paid 150 times, not 210
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
positions = "rope"    # RoPE instead of learned positions
norm = "rmsnorm"      # RMSNorm instead of LayerNorm
mlp = "relu2"         # squared ReLU
qk_norm = True        # RMS-normalised queries and keys
zero_init_proj = True # every block starts as the identity
attn_window = 3       # sliding-window attention: a query sees itself and the 2 keys before it,
attn_window_pattern = "SSSL"  # on three layers of four; the last layer sees the whole block

optimizer = "muon"    # Muon for the block matrices, AdamW for embeddings, head and gains
muon_lr = 0.03
learning_rate = 3e-3  # AdamW's part
weight_decay = 0.0
max_iters = 150
lr_schedule = "wsd"   # warmup, stable, then a linear warm-down to zero
warmup_iters = 20
warmdown_iters = 100  # two thirds of the run
min_lr = 0.0

device = "cpu"
compile = False
