import time
end = time.time() + 200
x = 0
while time.time() < end:
    for _ in range(200): x += 1
    time.sleep(0.0003)
