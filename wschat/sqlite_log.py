"""``python -m wschat.sqlite_log PATH``: a worker's SQLite writer process.

The command (and so what ``ps`` shows beside each worker) is kept by this
module; the code is :mod:`wschat.persistence.sqlite`.
"""

from .persistence.sqlite import main

if __name__ == "__main__":
    main()
