# A small language model of SMS text: the base for config/finetune_spam_lora.py (and for full
# fine-tuning from a checkpoint of ours). It reads only the train split of the spam dataset.
#   python prepare.py --input ../shared/data/sms_spam/SMSSpamCollection --task classify \
#       --tokenizer bpe --vocab_size 1024 --max_length 64 --out data/spam
#   python prepare.py --input data/spam/train_text.txt --tokenizer_from data/spam --out data/spam_lm
#   OMP_NUM_THREADS=1 python train.py config/pretrain_spam_lm.py
out_dir = "out-spam-lm"
dataset = "spam_lm"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 32
block_size = 64
n_layer = 2           # the shape of config/finetune_spam.py
n_head = 4
n_embd = 64
dropout = 0.0
bias = False

learning_rate = 3e-3
max_iters = 1000
warmup_iters = 50
min_lr = 3e-4
beta2 = 0.99
device = "cpu"
