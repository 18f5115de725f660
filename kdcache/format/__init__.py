"""The cache format: what stage one hands stage two (a **contract**; docs/design.md).

- :mod:`.meta`          :class:`CacheMeta`, the typed description of a cache, and its array names
- :mod:`.attrs`         that description written to and parsed from the group's attrs (untrusted JSON)
- :mod:`.checked_json`  typed reading of untrusted JSON, one line per bad field
- :mod:`.codecs`        how an output is stored and read back: the protocol, dense outputs
- :mod:`.sparse`        top-k, sampled and hybrid codecs for large vocabularies
- :mod:`.head`          the head codec: the input of the teacher's output layer, the layer stored once
- :mod:`.draws`         counter-based draws: the same samples whatever the batch or process
- :mod:`.packing`       the packed token layout: real tokens only, on one token axis
"""

from .meta import (ATTR, BLOCK_STATS, BLOCKS, FORMAT_VERSION, ROW_DIGEST, SPANS, TOKEN_BLOCKS, VIEW_PARAMS, ArrayInfo,
                   CacheMeta, ConstantArray, DatasetInfo, DumpStats, OutputSpec, PackedTokens, TeacherAccuracy,
                   TeacherInfo, TokenizerInfo, Vocab)

__all__ = ["FORMAT_VERSION", "ATTR", "BLOCKS", "BLOCK_STATS", "ROW_DIGEST", "VIEW_PARAMS", "SPANS", "TOKEN_BLOCKS",
           "PackedTokens", "ArrayInfo", "ConstantArray", "OutputSpec", "TokenizerInfo", "TeacherInfo", "DatasetInfo",
           "Vocab", "TeacherAccuracy", "DumpStats", "CacheMeta"]
