"""The names a feature cache uses on disk (see DESIGN.md). No imports: every module may use them."""

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGES_DIR = "images"
TEXTS_NAME = "texts.parquet"
FAILED_NAME = "failed.parquet"
LOCK_NAME = ".vlaug-embed.lock"
TMP_MARKER = ".tmp-"  # in the name of a file or folder that is being written
# Row groups of at most 4,096 rows (vlaug embed's default part is one): a streaming reader
# decodes a row group at a time, and decoding a list column takes about 3x its size in
# repetition and definition levels, so 16,384-row groups cost ~150 MB more resident memory.
ROW_GROUP_ROWS = 4096
