// The fleet board's only script: swaps in the server-rendered board (already escaped by the
// hub) whenever the hub sends a `board` event. No framework, no build step.
'use strict';
(function () {
  const board = document.getElementById('board');
  const status = document.getElementById('status');
  window.fleetBoardUpdates = 0;
  const events = new EventSource('/board/events');
  events.addEventListener('board', (e) => {
    board.innerHTML = e.data;
    window.fleetBoardUpdates += 1;
    status.textContent = 'live · updated ' + new Date().toLocaleTimeString();
    status.className = 'live';
  });
  events.addEventListener('open', () => {
    status.textContent = 'live';
    status.className = 'live';
  });
  events.addEventListener('error', () => {
    status.textContent = 'reconnecting…';
    status.className = 'stale';
  });
})();
