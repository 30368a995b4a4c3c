"""`kubectl` for the deploy tests: hands its arguments and stdin to the `Double` serving in the
test's process (kubectl_double.py) and prints its answer. Built-in modules only, run with
``python -S -I``: a deploy calls kubectl a few hundred times. `kubectl kustomize` is the real
kubectl's (``$KUBECTL_REAL``): rendering is real.
"""

import os
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["kustomize"]:
        os.execv(os.environ["KUBECTL_REAL"], ["kubectl", *argv])
    import _socket

    stdin = sys.stdin.read() if "-f" in argv else ""
    request = repr((argv, stdin)).encode()
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    conn.connect(os.environ["KUBECTL_DOUBLE_SOCKET"])
    conn.sendall(b"%d\n" % len(request) + request)
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    reply = b"".join(chunks)
    if not reply:
        sys.stderr.write("kubectl double: no answer\n")
        return 1
    (sys.stdout if reply[0] == 0 else sys.stderr).buffer.write(reply[1:])
    return reply[0]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
