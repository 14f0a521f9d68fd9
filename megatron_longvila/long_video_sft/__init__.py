"""Long-video instruction data from raw videos (LongVILA's recipe for long SFT data): split each
video into clips, caption every clip, summarise the captions and generate question-answer pairs
about the whole video, then write webdataset shards of the project's sample format.

build            BuildConfig, build_long_video_sft (tools/build_long_video_sft.py)
annotate         one video -> clips, captions, summary, QA (AnnotationConfig, VideoAnnotator)
clips            clip boundaries: scene cuts with min/max length, fixed-length fallback
scenes           scene cuts by grayscale frame difference
captioners       Captioner protocol; Hugging Face vision-language folders; plug-ins
longvila_captioner  a LongVILA checkpoint as captioner (MM-SP generation on one rank)
text_generators  TextGenerator protocol; Hugging Face causal LM folders
prompts          the editable prompt templates (templates/*.txt)
qa_format        captions listed for prompts; parsing of "Q: ... / A: ..." output
result_cache     per-video results in the work folder (resume)
"""
