# An encoder (BERT-style) of SMS text, pretrained by masked language modelling: the shape, data and
# budget of config/pretrain_spam_lm.py, so that the two can be fine-tuned by config/finetune_spam.py
# side by side (README, "Encoder or decoder"). The datasets need a mask token:
#   python prepare.py --input ../shared/data/sms_spam/SMSSpamCollection --task classify \
#       --tokenizer bpe --vocab_size 1024 --max_length 64 --mask_token --out data/spam_m
#   python prepare.py --input data/spam_m/train_text.txt --tokenizer_from data/spam_m --out data/spam_m_lm
#   OMP_NUM_THREADS=1 python train.py config/pretrain_spam_mlm.py
#   OMP_NUM_THREADS=1 python train.py config/finetune_spam.py --dataset=spam_m --init_from=out-spam-mlm \
#       --out_dir=out-spam-enc
#   python sample.py --out_dir=out-spam-mlm --start="Call now to claim your [MASK] prize"
out_dir = "out-spam-mlm"
dataset = "spam_m_lm"
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
causal = False        # every position sees the whole message
objective = "mlm"     # 15% of the tokens chosen; 80% of those masked, 10% random, 10% kept
mlm_prob = 0.15

learning_rate = 3e-3
max_iters = 1000
warmup_iters = 50
min_lr = 3e-4
beta2 = 0.99
device = "cpu"
