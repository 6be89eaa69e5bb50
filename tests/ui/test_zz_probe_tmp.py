import time
from tests.ui.test_batch import loaded_bridge, page

def test_probe(qtbot, page):
    from PySide6.QtCore import QTimer
    page.input.setPlainText("\n".join(f"Question {i}: what is {i} plus {i}?" for i in range(64)))
    page.max_tokens.setValue(16)
    page.show(); qtbot.waitExposed(page)
    orig_submit = page.bridge.submit
    marks = []
    def submit(*a):
        if not marks: marks.append(time.perf_counter())
        return orig_submit(*a)
    page.bridge.submit = submit
    beats = []
    hb = QTimer(interval=10, timeout=lambda: beats.append(time.perf_counter())); hb.start()
    qtbot.waitUntil(lambda: len(beats) >= 3)
    t0 = time.perf_counter()
    page.run_button.click()
    t1 = time.perf_counter()
    qtbot.waitUntil(lambda: not page.running, timeout=60000)
    n = len(beats); qtbot.waitUntil(lambda: len(beats) >= n + 3)
    del page.bridge.submit
    print(f"\nclick took {1000*(t1-t0):.1f} ms (prepare {1000*(marks[0]-t0):.1f})")
    for a, b in zip(beats, beats[1:]):
        if b - a > 0.025:
            print(f"gap {1000*(b-a):.1f} ms at {1000*(a-t0):.0f} ms")
