# Direct preference optimization (dpo.py) of config/finetune_instruct.py's model on synthetic pairs:
# the instruction data's answer chosen, that model's own greedy answer rejected (see dpo.py's header).
#   python dpo.py --init_from=out-instruct --input=../shared/data/instruct/instruction-data.json \
#       --dataset=alpaca --out=data/alpaca_pairs.jsonl
#   python prepare.py --task preference --input data/alpaca_pairs.jsonl --tokenizer_from data/alpaca \
#       --max_length 256 --out data/alpaca_pairs
#   OMP_NUM_THREADS=1 python train.py config/dpo_instruct.py
#   python train.py config/dpo_instruct.py --out_dir=out-dpo-lora --trainable=lora --lora_rank=8 --learning_rate=2e-3
out_dir = "out-dpo"
dataset = "alpaca_pairs"
init_from = "out-instruct"      # the policy starts here, and a frozen copy of it is the reference
eval_interval = 25
eval_iters = 10
log_interval = 5
always_save_checkpoint = False  # keep the model with the best val DPO loss

batch_size = 8                  # pairs per micro-batch: 16 sequences
block_size = 256
dropout = 0.0

dpo_beta = 0.1
dpo_label_smoothing = 0.0
rpo_alpha = 0.0                 # 1.0 adds the chosen answers' cross-entropy (RPO)

learning_rate = 5e-5
max_iters = 150
warmup_iters = 10
min_lr = 5e-6
weight_decay = 0.0
device = "cpu"
