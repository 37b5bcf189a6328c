# Continue training a GPT-2-tokenized checkpoint on tiny shakespeare with a small learning rate.
# python prepare.py shakespeare
# python train.py config/finetune_shakespeare.py --init_from=PATH_OF_YOUR_CHECKPOINT
# init_from may be any checkpoint of this repo trained with the gpt2 tokenizer (a folder holding
# ckpt.pt, or the file itself), OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl: downloaded
# from Hugging Face), or a local Hugging Face folder with a 50257-token vocabulary (see hf.py);
# its architecture is kept, the optimizer starts afresh.
out_dir = "out-finetune-shakespeare"
dataset = "shakespeare"
init_from = "out-gpt2"

eval_interval = 50
eval_iters = 40
log_interval = 5
always_save_checkpoint = False  # keep the best model on val only

batch_size = 4
block_size = 256      # shorter than the checkpoint's context is fine: it is cropped
gradient_accumulation_steps = 8
dropout = 0.1

learning_rate = 3e-5  # small steps: adapt to the new text without forgetting the old
max_iters = 200
decay_lr = False
warmup_iters = 10
