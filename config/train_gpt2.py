# GPT-2 (124M) from scratch on OpenWebText, on one node of 8 GPUs:
# python prepare.py openwebtext   (about 9B GPT-2 tokens; see README)
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
out_dir = "out-gpt2"
dataset = "openwebtext"
preset = "gpt2"       # 12 layers, 12 heads, 768 wide, block_size 1024
dropout = 0.0
bias = False

# about 0.5M tokens per step: 12 sequences x 1024 tokens x 40 micro-batches (5 per GPU on 8 GPUs)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 300B tokens in all
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1

eval_interval = 1000
eval_iters = 200
log_interval = 10

dtype = "bfloat16"
compile = True
wandb_log = False     # set True (and wandb_project) to follow the run on Weights & Biases
wandb_project = "gpt2"
wandb_run_name = "gpt2-124M"
