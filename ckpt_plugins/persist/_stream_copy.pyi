STREAMS: int
STREAM_MIN: int

def copy(dst: int, src: int, nbytes: int, /) -> None: ...
