# A small model that has begun to learn addition ("37+485=522", operands of 1-3 digits; rewards.py),
# the starting point of config/grpo_arithmetic.py. Short on purpose: it stops part-way, where
# reinforcement learning has something left to fix. Each evaluation logs arithmetic/acc, exact match
# on the task's val problems: it sits near 10% for 2,000 iterations, then jumps to ~70% within about
# 100 (iterations 2350-2450 on our machine), so this run stops inside the jump, on the schedule of a
# 4,000-iteration run. The jump's place varies a little with the machine: if the log shows it later or
# earlier, move max_iters (lr_decay_iters keeps the schedule).
#   python prepare.py arithmetic --problems 200000
#   python train.py config/pretrain_arithmetic.py
#   python eval.py --out_dir=out-arith --tasks=arithmetic --split=test      # exact match, 1,000 problems
out_dir = "out-arith"
dataset = "arithmetic"
eval_interval = 100
eval_examples = 500           # arithmetic/acc on all of the val problems
eval_iters = 20
log_interval = 50

batch_size = 32
block_size = 32
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

learning_rate = 2e-3
max_iters = 2400
lr_decay_iters = 4000
warmup_iters = 50
min_lr = 2e-4
beta2 = 0.99
device = "cpu"
dtype = "float32"
