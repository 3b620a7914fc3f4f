/***
* approxrun test circuit (not part of EvoApproxLib): two's-complement product bits of the operand
* bytes, three low bits dropped, computed on unsigned types like an evolved gate netlist.
***/
// MAE% = 0.42e-2 %
// MAE = 275.0e-2 
// WCE% = 0.011 %
// WCE = 7 
// EP% = 6875e-2 %
// MRE% = 0.57 %
// MSE = 1.325e1 
// PDK45_PWR = 0.2e-0 mW
// PDK45_AREA = 3.5E2 um2
// PDK45_DELAY = 1.2 ns
#include <stdint.h>
#include <stdlib.h>

uint16_t mul8s_T02(uint8_t A, uint8_t B)
{
  uint16_t P = (uint16_t)(A * B);
  if ((A >> 7) & 1)
    P -= (uint16_t)(B << 8);
  if ((B >> 7) & 1)
    P -= (uint16_t)(A << 8);
  return P & 0xFFF8;
}
