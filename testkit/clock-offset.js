// Preloaded into Azurite (`node --require`) by `Azurite::start_with_clock_offset`: shifts
// the JavaScript clock of the emulator by LEADSYNC_TEST_CLOCK_OFFSET_MS, so its `Date`
// response headers and entity `Timestamp`s tell another time than the host's clock, as
// a storage service's clock can differ from a client's. Node's own HTTP layer keeps the
// real time (it uses its primordial Date), but Azurite's table handlers set the Date
// header of every answer from their own `new Date()`.
'use strict';
const offset = Number(process.env.LEADSYNC_TEST_CLOCK_OFFSET_MS || 0);
if (offset) {
  const RealDate = Date;
  const now = () => RealDate.now() + offset;
  global.Date = new Proxy(RealDate, {
    construct(target, args, newTarget) {
      const shape = newTarget === global.Date ? target : newTarget;
      return Reflect.construct(target, args.length ? args : [now()], shape);
    },
    apply() {
      return new RealDate(now()).toString();
    },
    get(target, prop) {
      return prop === 'now' ? now : Reflect.get(target, prop, target);
    },
  });
}
