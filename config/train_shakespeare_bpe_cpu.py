# The BPE twin of train_shakespeare_char_cpu.py: the same model and schedule on tiny shakespeare
# tokenized by a 1,024-token byte-level BPE trained on it (about 3 characters a token, so each window
# of 64 tokens sees about three times the text). Compare the two by val/bpb, not val loss.
# python prepare.py shakespeare_char
# python prepare.py --input data/shakespeare_char/input.txt --tokenizer bpe --vocab_size 1024 --out data/shakespeare_bpe
# python train.py config/train_shakespeare_bpe_cpu.py
out_dir = "out-shakespeare-bpe-cpu"
dataset = "shakespeare_bpe"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1         # a third as many tokens as characters: 3,000 iterations see each about 8 times
bias = False

learning_rate = 1e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False
