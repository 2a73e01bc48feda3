"""Scale-out: three smart hosts on 127.0.0.1, .2 and .3, one down and one answering Z;
every message a client sends is accepted by the healthy one."""

import os
import re
import shutil
import socket
import subprocess

import pytest

from miniqmail import envelope
from smarthost.init import init
from tests.conftest import Daemon, program, wait_files

pytestmark = pytest.mark.timeout(120)
ME = "mx.test.invalid"


def start(root, addr):
    d = Daemon(root, ["--qmqp", f"{addr}:0"])
    line = d.wait_log("qmqpd: listening on")
    return d, int(re.search(r":(\d+)\s*$", line).group(1))


def test_failover_across_three_smart_hosts(tmp_path):
    roots = [init(str(tmp_path / f"host{i}"), me=ME) for i in (1, 2, 3)]
    # host 1 is down: a port that was bound once and is closed now
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down_port = s.getsockname()[1]
    # host 2 answers Z: once running, its queue cannot commit a message (todo/ is gone;
    # its entries' first files may already be made, see QmqpListener's spare draft)
    z, z_port = start(roots[1], "127.0.0.2")
    z.wait_log("status: local 0/")
    shutil.rmtree(os.path.join(roots[1].queue_dir, "todo"))
    ok, ok_port = start(roots[2], "127.0.0.3")
    try:
        ctl = tmp_path / "client" / "control"
        ctl.mkdir(parents=True)
        (ctl / "qmqpservers").write_text(f"127.0.0.1:{down_port}\n127.0.0.2:{z_port}\n127.0.0.3:{ok_port}\n")
        env = dict(os.environ, MINIQMAIL_ROOT=str(tmp_path / "client"))
        for i in range(10):
            rfd, wfd = os.pipe()
            os.write(wfd, envelope.encode("ws@client.invalid", [f"example@{ME}"]))
            os.close(wfd)
            code = subprocess.run([program("qmail-qmqpc")], input=b"Subject: scale %d\n\nbody\n" % i,
                                  stdout=rfd, env=env, timeout=60).returncode
            os.close(rfd)
            assert code == 0
        files = wait_files(roots[2].sub("home", "example", "Maildir", "new"), 10)
        subjects = sorted(re.search(rb"Subject: scale (\d+)", open(f, "rb").read()).group(1) for f in files)
        assert subjects == sorted(b"%d" % i for i in range(10))
        assert z.count("qmqpd: refused") == 10
        assert os.listdir(roots[1].sub("home", "example", "Maildir", "new")) == []
    finally:
        z.stop()
        ok.stop()
