# The "baby GPT" on one GPU: a 10.7M-parameter character-level model of tiny shakespeare.
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250   # the model overfits this small corpus: evaluate often, keep the best
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

batch_size = 64
block_size = 256      # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False

learning_rate = 1e-3  # a small model can take a larger step
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99          # more tokens per step would allow 0.95; this batch is small
warmup_iters = 100

compile = True
