/***
* approxrun test circuit (not part of EvoApproxLib): the exact product with bit 0 flipped when both
* operands are odd; lower-case operand names.
***/
// MAE% = 0.00038 %
// MAE = .25 
// WCE% = 0.0015 %
// WCE = 1. 
// EP% = 25 %
// MRE% = 0.018 %
// MSE = 0.25 
// PDK45_PWR = 0.380 mW
#include <stdint.h>
#include <stdlib.h>

uint16_t mul8u_T05(uint8_t a, uint8_t b)
{
  return (uint16_t)((a * b) ^ ((a & b) & 1));
}
