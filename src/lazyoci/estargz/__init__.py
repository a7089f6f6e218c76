"""eStargz: a gzip layer that carries its own index (a TOC), served lazily through it.

`footer.py` reads where the TOC starts, `index.py` parses the TOC into a lazy layer
index (fs/layer_index.py), `remote.py` fetches and checks it from a registry at pull time.
"""

from lazyoci.estargz.footer import parse_footer
from lazyoci.estargz.index import EStargzEntry, EStargzIndex, read_toc
from lazyoci.estargz.remote import TOC_DIGEST_ANNOTATION, fetch_index, is_estargz

__all__ = ["EStargzEntry", "EStargzIndex", "TOC_DIGEST_ANNOTATION", "fetch_index", "is_estargz",
           "parse_footer", "read_toc"]
