# From outside: `sync --dry-run --json` then `sync --json`, with the real
# binary at its defaults against the bench emulators (N accounts). Between
# rounds a day is made to pass for the store (verify_from moved back), so
# each round has a re-verification slice to show and to send.
import json, sqlite3, subprocess, sys
emu_bin, billsync, n = sys.argv[1], sys.argv[2], sys.argv[3]
emu = subprocess.Popen([emu_bin, n], env={"BILLSYNC_BENCH_ROLE": "emulators", "PATH": "/usr/bin:/bin"},
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
config = emu.stdout.readline().strip()
state = config.rsplit("/", 1)[0] + "/state.db"
def stats():
    emu.stdin.write("stats\n"); emu.stdin.flush()
    return json.loads(emu.stdout.readline())
def sync(*args):
    out = subprocess.run([billsync, "--config", config, "sync", "--json", *args],
                         capture_output=True, text=True)
    return out.returncode, json.loads(out.stdout)
print("initial sync exit", sync("--full")[0])
for rnd in range(3):
    db = sqlite3.connect(state)
    db.execute("UPDATE applied_users SET verify_from = verify_from - 2*86400")
    db.execute("UPDATE source_accounts SET verify_from = verify_from - 2*86400 WHERE verify_from IS NOT NULL")
    db.commit(); db.close()
    rc, dry = sync("--dry-run")
    before = stats()
    rc2, real = sync()
    after = stats()
    shown = sorted((p["login"], p["action"]) for p in dry["plan"])
    print(f"round {rnd}: dry-run exit {rc} operations {dry['operations']} plan {shown}")
    print(f"round {rnd}: sync exit {rc2} operations {real['operations']} "
          f"VMS requests {after['vms'] - before['vms']} detail reads {after['details'] - before['details']}")
    print(f"round {rnd}: same operations: {dry['operations'] == real['operations']}")
emu.stdin.write("quit\n"); emu.stdin.flush(); emu.wait()
