"""Data on the path video -> frames -> codes: video files (`video_io`), clip datasets (`datasets`), the code-shard
format between the two stages (`codes`), and the labelled synthetic set of the demo and tests (`synthetic`)."""
