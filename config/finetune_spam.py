# Spam classifier (the "LLMs from scratch" SMS example), trained from scratch on a 2-core CPU:
# a small GPT with a classification head on the last real token of each message.
#   python prepare.py --input ../shared/data/sms_spam/SMSSpamCollection --task classify \
#       --tokenizer bpe --vocab_size 1024 --max_length 64 --out data/spam
#   OMP_NUM_THREADS=1 python train.py config/finetune_spam.py   # ~2 min alone; 1 thread beats 2 on a busy CPU
#   python sample.py --out_dir=out-spam --start="WINNER! Claim your free prize now, call 0800"
# From a checkpoint of ours instead: --init_from=PATH (same tokenizer; prepare with --tokenizer_from).
# LoRA variant: config/finetune_spam_lora.py. Metrics (val each eval, test at the end): metrics.jsonl.
# Measured here (2-core CPU, shared): test acc 0.987, F1 0.953 (spam) from scratch in 153 s;
# from out-spam-lm (--init_from): test acc 0.988, F1 0.955.
out_dir = "out-spam"
dataset = "spam"
init_from = "scratch"
eval_interval = 100
eval_iters = 10
log_interval = 20
always_save_checkpoint = True  # the saved model is the one the final test metrics describe

batch_size = 32
block_size = 64       # messages are cut to 64 BPE tokens by prepare.py (805 of the 5,574, 14%, are longer)

n_layer = 2
n_head = 4
n_embd = 64
dropout = 0.1
bias = False

cls_lm_weight = 0.0   # set e.g. 0.5 to add GPT-1's auxiliary language-model loss
class_weights = False
balanced = False

learning_rate = 1e-3
max_iters = 800
warmup_iters = 50
min_lr = 1e-4
weight_decay = 0.1
device = "cpu"
compile = False
