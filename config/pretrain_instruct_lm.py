# A small base model for config/finetune_instruct.py: a language model of tiny shakespeare plus
# the train split of the instruction data as plain text (no end-of-text between records, so
# stopping is left for fine-tuning to teach), with the instruction data's BPE tokenizer.
#   python prepare.py --input ../shared/data/instruct/instruction-data.json --task instruct \
#       --tokenizer bpe --vocab_size 2048 --max_length 256 --test_fraction 0.1 --out data/alpaca
#   mkdir -p data/alpaca_lm_src && cp ../shared/data/tinyshakespeare/input.txt data/alpaca_lm_src/shakespeare.txt \
#       && cp data/alpaca/train_text.txt data/alpaca_lm_src/alpaca.txt
#   python prepare.py --input data/alpaca_lm_src --tokenizer_from data/alpaca --out data/alpaca_lm
#   OMP_NUM_THREADS=1 python train.py config/pretrain_instruct_lm.py
out_dir = "out-instruct-lm"
dataset = "alpaca_lm"
eval_interval = 200
eval_iters = 10
log_interval = 20

batch_size = 8
block_size = 256
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

learning_rate = 2e-3
max_iters = 600
warmup_iters = 50
min_lr = 2e-4
beta2 = 0.99
device = "cpu"
