# The LLaMA-style twin of train_shakespeare_char_cpu.py: RoPE, RMSNorm, SwiGLU, grouped-query
# attention, untied embeddings; same depth, width, data, schedule and parameter count (804K vs 804K).
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_llama.py
out_dir = "out-shakespeare-char-llama"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_kv_head = 2         # 2 query heads share each key/value head
n_embd = 128
norm = "rmsnorm"
positions = "rope"
rope_theta = 10000.0  # 500000 (Llama 3) is for long contexts; 64 characters need no more than the classic base
mlp = "swiglu"
mlp_hidden = 384      # 3 matrices of 128x384 = the 2 of 128x512 in the GELU MLP, plus what GQA saves on k and v
tie_embeddings = False  # the untied lm_head takes the place of GPT-2's position table (65 x 128 vs 64 x 128)
dropout = 0.0
bias = False

learning_rate = 1e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False
