"""Video data pipeline on Megatron-Energon; import the modules directly (this package imports
nothing, so ``data.batch`` stays light for the model side).

batch            the sample/batch contract with the model
config           DataConfig
loader           build_train_loader, TrainLoader (state_dict / load_state_dict)
task_encoder     the Energon task encoder (cook, pre-encode, pack, post-encode, batch)
chat_template    qwen2 / llama3 templates rendered to ids with assistant labels
tokenizer        HF folder or sentencepiece model; tiny tokenizers for tests
video            probe, uniform frame indices, decoding by seeking
vision_transform pad/crop resize and normalization
sample_format    the layout of one sample in a shard
shard_writer     folder + JSONL -> shards (tools/make_webdataset.py)
shard_index      Energon metadata without prompts; shards cut short
shard_dataset    the Energon dataset class named by dataset.yaml
sample_issues    counting and logging of skipped samples
loader_state     Energon state <-> JSON
synthetic        synthetic shape videos with needles and scene cuts, and datasets of them
long_video_sft   raw videos -> long-video instruction shards (tools/build_long_video_sft.py)
"""
