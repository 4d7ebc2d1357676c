/dev/fd/3: line 47: ./gz: No such file or directory
